"""How quantizers put their integer symbols on the wire: packed, or entropy coded when it pays.

Without the entropy stage the size is static (``symbols_nbytes``). With it, the first byte says
which form follows, and the coder is used only when its output is smaller than packing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from commhooks.coding import entropy
from commhooks.coding.bitpack import pack_symbols, symbols_nbytes, unpack_symbols

__all__ = ["decode_symbols", "encode_symbols"]

_PACKED = 0
_ENTROPY = 1


def encode_symbols(symbols: Tensor, alphabet: int, use_entropy: bool = False) -> Tensor:
    """Symbols in ``0 .. alphabet-1`` to uint8 wire bytes."""
    if not use_entropy:
        return pack_symbols(symbols, alphabet)
    coded = entropy.encode(symbols, alphabet)
    if coded.numel() < symbols_nbytes(symbols.numel(), alphabet):
        tag, body = _ENTROPY, coded
    else:
        tag, body = _PACKED, pack_symbols(symbols, alphabet)
    head = torch.tensor([tag], dtype=torch.uint8, device=body.device)
    return torch.cat([head, body])


def decode_symbols(data: Tensor, alphabet: int, count: int, use_entropy: bool = False) -> Tensor:
    """Inverse of :func:`encode_symbols`: ``count`` symbols as int64 on ``data``'s device."""
    if not use_entropy:
        return unpack_symbols(data, alphabet, count)
    tag = int(data[0])
    if tag == _ENTROPY:
        return entropy.decode(data[1:], alphabet, count)
    if tag == _PACKED:
        return unpack_symbols(data[1:], alphabet, count)
    raise ValueError(f"data: unknown symbol coding tag {tag}")
