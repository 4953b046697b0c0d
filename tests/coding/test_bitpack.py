"""Bit and radix packing: bit-exact round trips at every width, exact sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commhooks.coding.bitpack import (
    pack_bits,
    pack_symbols,
    symbols_nbytes,
    unpack_bits,
    unpack_symbols,
)


@pytest.mark.parametrize("bits", range(1, 33))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_bits_round_trip_and_size(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("alphabet", [2, 3, 4, 5, 6, 7, 9, 16, 17, 255, 256])
def test_pack_symbols_round_trip_and_size(alphabet: int) -> None:
    codes = torch.randint(0, alphabet, (1001,), generator=torch.Generator().manual_seed(alphabet))
    packed = pack_symbols(codes, alphabet)
    assert packed.numel() == symbols_nbytes(1001, alphabet)
    assert torch.equal(unpack_symbols(packed, alphabet, 1001), codes)


def test_ternary_packs_five_digits_a_byte() -> None:
    assert symbols_nbytes(1000, 3) == 200  # 1.6 bits a symbol, not 2
    assert symbols_nbytes(1000, 5) == 334  # 3 a byte: 2.67 bits, not 3


@settings(max_examples=60)
@given(bits=st.integers(1, 32), data=st.data())
def test_hypothesis_pack_bits(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.int64)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, len(values)), codes)


@pytest.mark.parametrize("bits", [0, 33, 2.5])
def test_bad_width_names_the_field(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, dtype=torch.int64), bits)  # type: ignore[arg-type]


def test_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 100)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [1, 3, 4, 8, 13, 24])
def test_cuda_matches_cpu(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (4099,), dtype=torch.int64)
    cpu = pack_bits(codes, bits)
    gpu = pack_bits(codes.cuda(), bits)
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(unpack_bits(gpu, bits, 4099).cpu(), codes)
