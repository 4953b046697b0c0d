"""Threshold sparsification: everything at or above the cut, nothing below."""

from __future__ import annotations

import pytest
import torch

import commhooks


@pytest.mark.parametrize("cut", [0.5, 2.0, 10.0])
def test_keeps_exactly_the_elements_at_or_above_the_cut(cut: float) -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    x[0] = cut  # on the boundary: kept
    c = commhooks.compressor(f"threshold:threshold={cut}")
    y = c.decompress(*c.compress(x))
    keep = x.abs() >= cut
    assert torch.equal(y[keep], x[keep]) and (y[~keep] == 0).all()


def test_nothing_above_the_cut_sends_only_the_index_header() -> None:
    c = commhooks.compressor("threshold:threshold=100")
    payload, ctx = c.compress(torch.randn(1000))
    assert payload[0].numel() == 0 and c.nbytes(payload) <= 2
    assert (c.decompress(payload, ctx) == 0).all()


def test_bad_threshold_names_the_field() -> None:
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="threshold"):
            commhooks.compressor(f"threshold:threshold={bad}")
