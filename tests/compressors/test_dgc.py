"""DGC sampled top-k: count near k, never far over, largest elements kept."""

from __future__ import annotations

import pytest
import torch

import commhooks


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_count_is_near_k_and_capped(ratio: float) -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(5))
    c = commhooks.compressor(f"dgc:ratio={ratio},max_excess=1.3")
    y = c.decompress(*c.compress(x))
    k = round(ratio * x.numel())
    count = int((y != 0).sum())
    assert 0.7 * k <= count <= 1.3 * k
    # Whatever was kept is the largest `count` elements.
    assert y[y != 0].abs().min() >= x.abs().topk(count).values.min()


def test_trims_to_k_when_far_over() -> None:
    x = torch.ones(10_000)  # every element ties, so the sampled threshold admits them all
    c = commhooks.compressor("dgc:ratio=0.01")
    assert int((c.decompress(*c.compress(x)) != 0).sum()) == 100


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_excess"):
        commhooks.compressor("dgc:max_excess=0.5")
    with pytest.raises(ValueError, match="ratio"):
        commhooks.compressor("dgc:ratio=0")
