"""fp16/bf16 casts: bytes, pre-division, agreement with torch's own fp16 hook arithmetic."""

from __future__ import annotations

import pytest
import torch

import commhooks
from commhooks.testing import simulate_allreduce


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_wire_is_half_precision(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(1000)
    c = commhooks.compressor(name)
    payload, ctx = c.compress(x)
    assert payload[0].dtype == dtype and c.nbytes(payload) == 2000
    torch.testing.assert_close(c.decompress(payload, ctx), x.to(dtype).float())


def test_prescale_keeps_large_sums_finite() -> None:
    """Four ranks of 30000 each sum to 120000, past fp16's 65504; pre-division avoids that."""
    xs = [torch.full((8,), 30000.0) for _ in range(4)]
    for prescale, finite in ((True, True), (False, False)):
        ranks = [commhooks.compressor(f"fp16:prescale={prescale}") for _ in range(4)]
        exchanges = [c.exchange([x], ["w"], 4) for c, x in zip(ranks, xs)]
        simulate_allreduce(exchanges)
        out = exchanges[0].result()[0]
        assert bool(torch.isfinite(out).all()) == finite
        if finite:
            torch.testing.assert_close(out, torch.full((8,), 120000.0))


def test_matches_torch_fp16_hook_arithmetic() -> None:
    """torch's fp16_compress_hook: (x / world).half(), summed, back to the input dtype."""
    world = 3
    xs = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(world)]
    ranks = [commhooks.compressor("fp16") for _ in range(world)]
    exchanges = [c.exchange([x], ["w"], world) for c, x in zip(ranks, xs)]
    simulate_allreduce(exchanges)
    ours = exchanges[0].result()[0] / world
    theirs = torch.stack([(x / world).half() for x in xs]).sum(0).float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_bad_prescale_names_the_field() -> None:
    with pytest.raises(ValueError, match="prescale"):
        commhooks.compressor("bf16:prescale=sometimes")
