"""The delta index code's varint kernels against its torch path: the same bytes and indices."""

from __future__ import annotations

import pytest
import torch

from commhooks.coding.indices import decode_indices, encode_indices


def _both(monkeypatch: pytest.MonkeyPatch, fn, *args):
    fast = fn(*args)
    with monkeypatch.context() as m:
        m.setenv("COMMHOOKS_NATIVE", "0")
        slow = fn(*args)
    return fast, slow


@pytest.mark.parametrize("k", [0, 1, 1000, 200_000])
def test_codes_match_the_torch_path(k, monkeypatch):
    n = 1 << 24
    gen = torch.Generator().manual_seed(k)
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    fast, slow = _both(monkeypatch, encode_indices, idx, n, "delta")
    assert torch.equal(fast, slow)
    back, back_slow = _both(monkeypatch, decode_indices, fast, n)
    assert torch.equal(back, idx) and torch.equal(back_slow, idx)


def test_gaps_of_every_byte_length_and_past_five_bytes(monkeypatch):
    """Gaps needing 1..5 bytes; a gap past 2**35 loses its high bits in both paths alike."""
    edges = [0, 127, 128, 2**14, 2**21, 2**28 - 1, 2**28, 2**34, 2**36 + 5]
    idx = torch.tensor(edges, dtype=torch.int64).cumsum(0)
    fast, slow = _both(monkeypatch, encode_indices, idx, 2**40, "delta")
    assert torch.equal(fast, slow)
    back, back_slow = _both(monkeypatch, decode_indices, fast, 2**40)
    assert torch.equal(back, back_slow)
    assert torch.equal(back[:-1], idx[:-1])  # the 5-byte cap is the format's, not the kernel's


def test_cut_off_or_overlong_codes_are_refused():
    with pytest.raises(ValueError, match="truncated"):
        decode_indices(torch.tensor([2, 5, 0x85], dtype=torch.uint8), 1000)
    with pytest.raises(ValueError, match="overlong"):
        decode_indices(torch.tensor([2, *[0x80] * 10, 1], dtype=torch.uint8), 1000)
