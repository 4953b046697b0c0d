"""Vectorised packing of small integer codes into uint8, on any device.

Two forms, and :func:`pack_symbols` picks the smaller for an alphabet:

* bit packing, ``bits`` per code (1..32), exactly ``ceil(n * bits / 8)`` bytes (see
  :func:`pack_bits` for the layout).
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
    "packed_size",
    "symbol_layout",
    "symbol_packing",
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


def _planes(bits: int) -> list[tuple[int, int]]:
    """``bits`` split into (offset, width) planes of 8, 4, 2 and 1 bits, low bits first."""
    planes, offset = [], 0
    for width in (8, 4, 2, 1):
        while bits - offset >= width:
            planes.append((offset, width))
            offset += width
    return planes


def _work_dtype(bits: int) -> torch.dtype:
    # The narrowest integer type that holds the codes keeps every pass cheap.
    return torch.uint8 if bits <= 8 else torch.int32 if bits <= 31 else torch.int64


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes, each below ``2**bits``, into ``ceil(n*bits/8)`` bytes.

    Layout: the first ``8*floor(n/8)`` codes go as bit planes of 8, 4, 2 and 1 bits (each
    packed with whole-byte strided ORs, the fast part), the remaining < 8 codes as a bit
    matrix. Both are exact to the bit, so the total is the minimum.
    """
    _check_bits(bits)
    c = codes.reshape(-1).to(_work_dtype(bits))
    n = c.numel()
    body = n - n % 8
    planes = _planes(bits)
    if len(planes) == 1:
        parts = [_pack_narrow(c[:body], bits)]
    else:
        parts = [_pack_narrow((c[:body] >> off) & ((1 << w) - 1), w) for off, w in planes]
    if body < n:
        parts.append(_pack_tail(c[body:], bits))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes as int64."""
    _check_bits(bits)
    need = (count * bits + 7) // 8
    if data.numel() != need:
        raise ValueError(f"data: {data.numel()} bytes cannot hold {count} codes of {bits} bits")
    body = count - count % 8
    out = torch.empty(count, dtype=torch.int64, device=data.device)
    pos = 0
    for off, w in _planes(bits):
        size = body * w // 8
        if off == 0:
            _unpack_narrow(data[pos : pos + size], w, out[:body])
        else:
            plane = torch.empty(body, dtype=torch.int64, device=data.device)
            _unpack_narrow(data[pos : pos + size], w, plane)
            out[:body].bitwise_or_(plane.bitwise_left_shift_(off))
        pos += size
    if body < count:
        out[body:] = _unpack_tail(data[pos:], bits, count - body)
    return out


def _pack_narrow(codes: Tensor, bits: int) -> Tensor:
    """Widths dividing 8: ``8/bits`` codes a byte by strided uint8 ORs."""
    c = codes.to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return c
    lanes = c.view(-1, per)
    out = lanes[:, 0].clone()
    for j in range(1, per):
        out.bitwise_or_(lanes[:, j] << (j * bits))
    return out


def _unpack_narrow(data: Tensor, bits: int, out: Tensor) -> None:
    """Write the ``8/bits`` codes of each byte into ``out`` (int64, ``len(data)*8/bits`` long)."""
    per = 8 // bits
    if per == 1:
        out.copy_(data)
        return
    lanes = out.view(-1, per)
    for j in range(per):
        torch.bitwise_and(data >> (j * bits), (1 << bits) - 1, out=lanes[:, j])


def _pack_tail(codes: Tensor, bits: int) -> Tensor:
    """A few codes as a flat bit matrix, padded to whole bytes."""
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int64)
    flat = ((codes.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)
    return _pack_narrow(F.pad(flat, (0, (-flat.numel()) % 8)), 1)


def _unpack_tail(data: Tensor, bits: int, count: int) -> Tensor:
    flat = torch.empty(data.numel() * 8, dtype=torch.int64, device=data.device)
    _unpack_narrow(data, 1, flat)
    flat = flat[: count * bits].view(count, bits)
    return (flat << torch.arange(bits, device=data.device, dtype=torch.int64)).sum(1)


def _radix_per_byte(alphabet: int) -> int:
    m = 0
    while alphabet ** (m + 1) <= 256:
        m += 1
    return m


def _use_radix(alphabet: int) -> bool:
    m = _radix_per_byte(alphabet)
    return m > 0 and 8 / m < bits_for(alphabet)


def symbol_layout(alphabet: int) -> tuple[str, int]:
    """How :func:`pack_symbols` packs this alphabet: ``("radix", symbols per byte)`` or
    ``("bits", bits per symbol)``."""
    if _use_radix(alphabet):
        return "radix", _radix_per_byte(alphabet)
    return "bits", bits_for(alphabet)


def symbol_packing(alphabet: int) -> tuple[int, int]:
    """(bits, radix) as :func:`pack_symbols` packs this alphabet (at most 256 symbols): bits
    per symbol (bit planes for widths other than 1, 2, 4, 8), or radix symbols per byte."""
    kind, size = symbol_layout(alphabet)
    return (0, size) if kind == "radix" else (size, 0)


def packed_size(n: int, packing: tuple[int, int]) -> int:
    """Bytes of ``n`` symbols packed as :func:`symbol_packing` says."""
    bits, radix = packing
    return -(-n // radix) if radix else (n * bits + 7) // 8


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
    s = symbols.reshape(-1).to(torch.uint8)
    pad = (-s.numel()) % m
    if pad:
        s = F.pad(s, (0, pad))
    # Every partial sum stays below alphabet**m <= 256, so uint8 arithmetic cannot wrap.
    lanes = s.view(-1, m)
    out = lanes[:, m - 1].clone()
    for j in range(m - 2, -1, -1):
        out.mul_(alphabet).add_(lanes[:, j])
    return out


def unpack_symbols(data: Tensor, alphabet: int, count: int) -> Tensor:
    """Inverse of :func:`pack_symbols`: ``count`` symbols as int64."""
    if not _use_radix(alphabet):
        return unpack_bits(data, bits_for(alphabet), count)
    if data.numel() != symbols_nbytes(count, alphabet):
        raise ValueError(f"data: {data.numel()} bytes cannot hold {count} symbols of {alphabet}")
    m = _radix_per_byte(alphabet)
    out = torch.empty((data.numel(), m), dtype=torch.int64, device=data.device)
    rest = data.clone()
    for j in range(m):
        out[:, j] = rest % alphabet
        rest.div_(alphabet, rounding_mode="floor")
    return out.view(-1)[:count]
