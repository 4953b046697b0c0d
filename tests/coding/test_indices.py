"""Sparse index codes: exact round trips, sizes, and the smallest form winning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commhooks.coding.indices import decode_indices, encode_indices, index_nbytes

CODINGS = ["auto", "smallest", "fixed", "bitmap", "delta"]


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 70_000])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_round_trip_and_declared_size(coding: str, n: int, density: float) -> None:
    k = int(n * density)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:k].sort().values
    code = encode_indices(idx, n, coding)
    assert torch.equal(decode_indices(code, n), idx)
    static = index_nbytes(k, n, coding)
    assert static is None or static == code.numel()


def test_each_form_wins_where_it_should() -> None:
    n = 1 << 20
    sparse = torch.randperm(n)[: n // 1000].sort().values
    dense = torch.randperm(n)[: n // 4].sort().values
    smallest = {c: encode_indices(sparse, n, c).numel() for c in CODINGS}
    assert smallest["smallest"] == smallest["delta"] < smallest["fixed"] < smallest["bitmap"]
    assert encode_indices(dense, n, "auto").numel() == index_nbytes(len(dense), n, "bitmap")


def test_large_gaps_use_multi_byte_varints() -> None:
    n = 2**34
    idx = torch.tensor([0, 127, 128 + 127, 2**21, 2**33], dtype=torch.int64)
    assert torch.equal(decode_indices(encode_indices(idx, n, "delta"), n), idx)


@settings(max_examples=60)
@given(n=st.integers(1, 5000), data=st.data(), coding=st.sampled_from(CODINGS))
def test_hypothesis_round_trip(n: int, data: st.DataObject, coding: str) -> None:
    chosen = data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 300)))
    idx = torch.tensor(sorted(chosen), dtype=torch.int64)
    assert torch.equal(decode_indices(encode_indices(idx, n, coding), n), idx)


def test_corrupt_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="tag"):
        decode_indices(torch.tensor([9, 1, 2], dtype=torch.uint8), 100)
    with pytest.raises(ValueError, match="empty"):
        decode_indices(torch.empty(0, dtype=torch.uint8), 100)
    with pytest.raises(ValueError, match="truncated"):
        decode_indices(torch.tensor([2, 0x85], dtype=torch.uint8), 1000)
    with pytest.raises(ValueError, match="index_coding"):
        encode_indices(torch.tensor([1]), 10, "zip")


@pytest.mark.parametrize("coding", ["auto", "fixed", "bitmap"])
@pytest.mark.parametrize("k", [1, 300, 9000])
def test_a_known_form_decodes_without_reading_the_code(coding: str, k: int) -> None:
    from commhooks.coding.indices import static_form

    n = 30_000
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values
    code = encode_indices(idx, n, coding)
    assert torch.equal(decode_indices(code, n, static_form(k, n, coding)), idx)
    assert static_form(k, n, "delta") is None and static_form(k, n, "smallest") is None


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("k", [0, 1, 300, 9000, 30_000])
def test_the_form_follows_from_the_count_and_the_code_length(
    monkeypatch: pytest.MonkeyPatch, kernels: str, coding: str, k: int
) -> None:
    # What a device step decodes with: the count of values sent and the code's length are
    # host values, so neither the tag nor the varint stream's length is read back.
    from commhooks.coding.indices import code_form

    monkeypatch.setenv("COMMHOOKS_KERNELS", kernels)
    n = 30_000
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values
    code = encode_indices(idx, n, coding)
    form = code_form(code, k, n, coding)
    assert form[0] == int(code[0])
    assert torch.equal(decode_indices(code, n, form), idx)
