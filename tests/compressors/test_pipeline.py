"""Pipelines: a sparsifier then a value codec; nonsense refused at construction."""

from __future__ import annotations

import pytest
import torch

import commhooks
from commhooks.compressors.base import Kind


def test_topk_then_uint8_values_round_trip() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    topk = commhooks.compressor("topk:ratio=0.01")
    pipe = commhooks.compressor("topk:ratio=0.01|uniform:bits=8")
    assert pipe.capabilities.kind is Kind.PIPELINE
    ref = topk.decompress(*topk.compress(x))
    payload, ctx = pipe.compress(x)
    out = pipe.decompress(payload, ctx)
    assert torch.equal(out != 0, ref != 0)
    step = (ref.max() - ref.min()) / 255
    assert (out - ref).abs().max() <= step
    # 200 one-byte codes + scales + the index code, instead of 200 fp32 values.
    assert pipe.nbytes(payload) < topk.nbytes(topk.compress(x)[0])


def test_dynamic_sparsifier_with_a_quantizer_decodes_any_count() -> None:
    pipe = commhooks.compressor("threshold:threshold=1.5|uniform:bits=4")
    for n in (1, 10, 1000):
        x = torch.randn(n)
        out = pipe.decompress(*pipe.compress(x))
        assert torch.equal(out != 0, x.abs() >= 1.5)


def test_randomk_with_cast_stays_summable() -> None:
    assert commhooks.compressor("randomk:ratio=0.1|bf16").capabilities.summable
    assert not commhooks.compressor("topk:ratio=0.1|bf16").capabilities.summable


@pytest.mark.parametrize(
    "spec,why",
    [
        ("uniform:bits=4|topk", "must start with a sparsifier"),
        ("topk|dgc", "cannot code the kept values"),
        ("topk|powersgd", "cannot code the kept values"),
        ("topk|uniform|fp16", "2 stages"),
        ("topk|nosuch", "unknown"),
    ],
)
def test_nonsense_compositions_are_refused(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        commhooks.compressor(spec)
