"""Vectorised packing of small integer codes into uint8, on any device.

Two forms, and :func:`pack_symbols` picks the smaller for an alphabet:

* bit packing, ``bits`` per code (1..32): the low ``bits % 8`` bits of each group of eight codes
  share ``bits % 8`` bytes; the remaining whole bytes of each code follow as little-endian bytes.
  The total is exactly ``ceil(n * bits / 8)`` bytes.
* radix packing, ``m`` codes of an alphabet of size ``k`` per byte where ``k**m <= 256``
  (five ternary digits per byte: 1.6 bits each instead of 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bits_for",
    "pack_bits",
    "pack_symbols",
    "symbols_nbytes",
    "unpack_bits",
    "unpack_symbols",
]


def bits_for(alphabet: int) -> int:
    """Bits needed for codes ``0 .. alphabet-1``."""
    return max(1, math.ceil(math.log2(alphabet))) if alphabet > 1 else 1


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ValueError(f"bits={bits!r}: must be an integer in 1..32")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes, each below ``2**bits``, into ``ceil(n*bits/8)`` bytes."""
    _check_bits(bits)
    dev = codes.device
    c = codes.reshape(-1).to(torch.int64)
    n = c.numel()
    whole, rem = divmod(bits, 8)
    if rem == 0 and whole == 1:
        return c.to(torch.uint8)
    parts = []
    if whole:
        shifts = torch.arange(whole, device=dev, dtype=torch.int64) * 8
        parts.append((((c >> rem).unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1))
    if rem:
        low = c & ((1 << rem) - 1)
        pad = (-n) % 8
        if pad:
            low = F.pad(low, (0, pad))
        word = (low.view(-1, 8) << (torch.arange(8, device=dev, dtype=torch.int64) * rem)).sum(1)
        shifts = torch.arange(rem, device=dev, dtype=torch.int64) * 8
        packed = ((word.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
        parts.append(packed[: (n * rem + 7) // 8])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes as int64."""
    _check_bits(bits)
    dev = data.device
    whole, rem = divmod(bits, 8)
    need = (count * bits + 7) // 8
    if data.numel() != need:
        raise ValueError(f"data: {data.numel()} bytes cannot hold {count} codes of {bits} bits")
    if rem == 0 and whole == 1:
        return data.to(torch.int64)
    out = torch.zeros(count, dtype=torch.int64, device=dev)
    offset = 0
    if whole:
        hi = data[: count * whole].to(torch.int64).view(count, whole)
        shifts = torch.arange(whole, device=dev, dtype=torch.int64) * 8
        out = (hi << shifts).sum(1) << rem
        offset = count * whole
    if rem:
        low_bytes = data[offset:].to(torch.int64)
        groups = (count + 7) // 8
        low_bytes = F.pad(low_bytes, (0, groups * rem - low_bytes.numel()))
        shifts = torch.arange(rem, device=dev, dtype=torch.int64) * 8
        words = (low_bytes.view(groups, rem) << shifts).sum(1)
        low = (words.unsqueeze(1) >> (torch.arange(8, device=dev, dtype=torch.int64) * rem)) & (
            (1 << rem) - 1
        )
        out = out | low.reshape(-1)[:count]
    return out


def _radix_per_byte(alphabet: int) -> int:
    m = 0
    while alphabet ** (m + 1) <= 256:
        m += 1
    return m


def _use_radix(alphabet: int) -> bool:
    m = _radix_per_byte(alphabet)
    return m > 0 and 8 / m < bits_for(alphabet)


def symbols_nbytes(count: int, alphabet: int) -> int:
    """Bytes :func:`pack_symbols` uses for ``count`` symbols of an alphabet of this size."""
    if _use_radix(alphabet):
        m = _radix_per_byte(alphabet)
        return (count + m - 1) // m
    return (count * bits_for(alphabet) + 7) // 8


def pack_symbols(symbols: Tensor, alphabet: int) -> Tensor:
    """Pack symbols in ``0 .. alphabet-1`` in the denser of bit and radix packing."""
    if alphabet < 2:
        raise ValueError(f"alphabet={alphabet}: needs at least two symbols")
    if not _use_radix(alphabet):
        return pack_bits(symbols, bits_for(alphabet))
    m = _radix_per_byte(alphabet)
    s = symbols.reshape(-1).to(torch.int64)
    pad = (-s.numel()) % m
    if pad:
        s = F.pad(s, (0, pad))
    weights = alphabet ** torch.arange(m, device=s.device, dtype=torch.int64)
    return (s.view(-1, m) * weights).sum(1).to(torch.uint8)


def unpack_symbols(data: Tensor, alphabet: int, count: int) -> Tensor:
    """Inverse of :func:`pack_symbols`: ``count`` symbols as int64."""
    if not _use_radix(alphabet):
        return unpack_bits(data, bits_for(alphabet), count)
    if data.numel() != symbols_nbytes(count, alphabet):
        raise ValueError(f"data: {data.numel()} bytes cannot hold {count} symbols of {alphabet}")
    m = _radix_per_byte(alphabet)
    weights = alphabet ** torch.arange(m, device=data.device, dtype=torch.int64)
    digits = (data.to(torch.int64).unsqueeze(1) // weights) % alphabet
    return digits.reshape(-1)[:count]
