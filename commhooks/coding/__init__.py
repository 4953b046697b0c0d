"""Wire coding: bit and radix packing, sparse index codes, lossless entropy coding."""

from commhooks.coding.bitpack import (
    bits_for,
    pack_bits,
    pack_symbols,
    symbols_nbytes,
    unpack_bits,
    unpack_symbols,
)

__all__ = [
    "bits_for",
    "pack_bits",
    "pack_symbols",
    "symbols_nbytes",
    "unpack_bits",
    "unpack_symbols",
]
