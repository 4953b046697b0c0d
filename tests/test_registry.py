"""Names, spec strings and the errors they give."""

from __future__ import annotations

import pytest

import commhooks
from commhooks.compressors.topk import TopKConfig

EXPECTED = {
    "topk", "randomk", "threshold", "dgc", "uniform", "qsgd", "nonuniform",
    "ternary", "sign", "adaptive", "powersgd", "fp16", "bf16", "identity",
}  # fmt: skip


def test_every_family_is_registered() -> None:
    assert set(commhooks.available()) == EXPECTED


def test_spec_values_are_typed_by_the_config() -> None:
    c = commhooks.compressor("topk:ratio=0.05,mode=exact,sample=100,index_coding=delta")
    assert c.config == TopKConfig(ratio=0.05, mode="exact", sample=100, index_coding="delta")


def test_config_objects_and_compressors_pass_through() -> None:
    cfg = TopKConfig(ratio=0.2)
    c = commhooks.compressor(cfg)
    assert c.config is cfg and commhooks.compressor(c) is c


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nosuch", "unknown"),
        ("", "non-empty"),
        ("topk:ratio", "field=value"),
        ("topk:rate=0.1", "unknown field 'rate'"),
        ("topk:ratio=x", "ratio"),
        ("randomk:unbiased=2", "unbiased"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        commhooks.compressor(spec)


def test_non_spec_objects_are_refused() -> None:
    with pytest.raises(ValueError, match="spec"):
        commhooks.compressor(42)  # type: ignore[arg-type]
