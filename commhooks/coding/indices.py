"""Sparse index codes: sorted unique positions in ``0 .. n-1`` as the fewest bytes we can manage.

Three forms, each preceded by a one-byte tag so any rank can decode any rank's code:

* ``fixed``: every index in ``max(8, ceil(log2 n))`` bits, bit-packed. Size ``ceil(k*w/8)``.
* ``bitmap``: one bit per position. Size ``ceil(n/8)``; wins above a density of about ``1/w``.
* ``delta``: gaps between successive indices as LEB128 varints (7 bits a byte). Smallest at low
  density (about 1.1-1.5 bytes an index at 1%), but its size depends on the data.

``auto`` picks the smaller of fixed and bitmap, whose sizes depend only on (k, n), so payloads
stay static; ``smallest`` also considers delta and picks by actual size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from commhooks.kernels.backend import Backend

from commhooks.coding.bitpack import bits_for, pack_bits, unpack_bits

__all__ = [
    "IndexCoding",
    "code_form",
    "decode_indices",
    "encode_indices",
    "index_nbytes",
    "static_form",
]

IndexCoding = Literal["auto", "smallest", "fixed", "bitmap", "delta"]
INDEX_CODINGS: tuple[str, ...] = ("auto", "smallest", "fixed", "bitmap", "delta")

_FIXED, _BITMAP, _DELTA = 0, 1, 2
_VARINT_BYTES = 5  # enough for gaps below 2**35


def _width(n: int) -> int:
    # At least 8 bits, so the padding of the last byte is shorter than one index and the count
    # follows from the byte length.
    return max(8, bits_for(max(n, 2)))


def _static_choice(k: int, n: int) -> tuple[int, int]:
    fixed = (k * _width(n) + 7) // 8
    bitmap = (n + 7) // 8
    return (_FIXED, fixed) if fixed <= bitmap else (_BITMAP, bitmap)


def index_nbytes(k: int, n: int, coding: str) -> int | None:
    """Bytes (tag included) for k of n indices, or None when the size depends on the data."""
    if coding in ("delta", "smallest"):
        return None
    if coding == "fixed":
        return 1 + (k * _width(n) + 7) // 8
    if coding == "bitmap":
        return 1 + (n + 7) // 8
    return 1 + _static_choice(k, n)[1]


def _varint_kernels(t: Tensor) -> Backend | None:
    """The kernel backend that codes varints for ``t``, or None (the torch code)."""
    # Imported here: the kernels package imports the codecs, which import this module.
    from commhooks.kernels.dispatch import backend_for

    return backend_for(t, op="varint")


def _delta_encode(idx: Tensor) -> Tensor:
    ops = _varint_kernels(idx) if idx.dtype == torch.int64 else None
    if ops is not None:
        return ops.varint_encode(idx)
    gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
    j = torch.arange(_VARINT_BYTES, device=idx.device, dtype=torch.int64)
    nbytes = 1 + (gaps.unsqueeze(1) >= (1 << (7 * (j[1:])))).sum(1)
    groups = (gaps.unsqueeze(1) >> (7 * j)) & 0x7F
    more = j.unsqueeze(0) < (nbytes.unsqueeze(1) - 1)
    groups = groups | (more.to(torch.int64) << 7)
    return groups[j.unsqueeze(0) < nbytes.unsqueeze(1)].to(torch.uint8)


def _delta_decode(body: Tensor, k: int | None = None) -> Tensor:
    """The indices of a varint gap stream; ``k``: their count where the caller knows it,
    so that nothing is read back to the host (the stream is then trusted whole)."""
    ops = _varint_kernels(body) if body.dtype == torch.uint8 else None
    if ops is not None:
        return ops.varint_decode(body)
    b = body.to(torch.int64)
    last = (b & 0x80) == 0
    pos = torch.arange(b.numel(), device=b.device)
    if k is None:
        if body.numel() and not bool(last[-1]):
            raise ValueError("index code: delta varint stream is truncated")
        k = int(last.sum())
        ends = pos[last]
    else:
        ends = torch.nonzero_static(last, size=k).squeeze(1)
    group = torch.cumsum(last.to(torch.int64), 0) - last.to(torch.int64)
    starts = torch.zeros(k, dtype=torch.int64, device=b.device)
    if k:
        starts[1:] = ends[:-1] + 1
    shift = 7 * (pos - starts[group])
    gaps = torch.zeros(k, dtype=torch.int64, device=b.device)
    gaps.scatter_add_(0, group, (b & 0x7F) << shift)
    return torch.cumsum(gaps + 1, 0) - 1


def encode_indices(idx: Tensor, n: int, coding: str = "auto") -> Tensor:
    """Encode sorted, unique int64 indices below ``n`` as uint8 (tag byte first)."""
    k = idx.numel()
    if coding in ("auto", "smallest"):
        tag, size = _static_choice(k, n)
        if coding == "smallest":
            delta = _delta_encode(idx)
            if delta.numel() < size:
                tag, body = _DELTA, delta
            else:
                body = _encode_static(tag, idx, n)
        else:
            body = _encode_static(tag, idx, n)
    elif coding == "fixed":
        tag, body = _FIXED, _encode_static(_FIXED, idx, n)
    elif coding == "bitmap":
        tag, body = _BITMAP, _encode_static(_BITMAP, idx, n)
    elif coding == "delta":
        tag, body = _DELTA, _delta_encode(idx)
    else:
        raise ValueError(f"index_coding={coding!r}: must be one of {', '.join(INDEX_CODINGS)}")
    head = torch.tensor([tag], dtype=torch.uint8, device=idx.device)
    return torch.cat([head, body])


def _encode_static(tag: int, idx: Tensor, n: int) -> Tensor:
    if tag == _FIXED:
        return pack_bits(idx, _width(n))
    mask = torch.zeros(n, dtype=torch.int64, device=idx.device)
    mask[idx] = 1
    return pack_bits(mask, 1)


def static_form(k: int, n: int, coding: str) -> tuple[int, int] | None:
    """``(tag, k)`` of every code of k of n indices under ``coding``, where both follow from
    (k, n) alone (``auto``, ``fixed``, ``bitmap``); else None."""
    if coding == "auto":
        return _static_choice(k, n)[0], k
    if coding in ("fixed", "bitmap"):
        return (_FIXED if coding == "fixed" else _BITMAP), k
    return None


def code_form(code: Tensor, k: int, n: int, coding: str) -> tuple[int, int]:
    """``(tag, k)`` of a code of ``k`` of ``n`` indices under ``coding``, from the code's
    length alone (a host value: no read of its bytes). ``smallest`` sends the static form
    unless the varint stream is strictly shorter, so a body of the static form's length is
    the static form."""
    if coding == "delta":
        return _DELTA, k
    form = static_form(k, n, coding)
    if form is not None:
        return form
    tag, size = _static_choice(k, n)
    return (tag if code.numel() - 1 == size else _DELTA), k


def decode_indices(code: Tensor, n: int, form: tuple[int, int] | None = None) -> Tensor:
    """Inverse of :func:`encode_indices`: sorted int64 indices. ``form``: the code's
    :func:`static_form` or :func:`code_form`, where the caller knows it; the tag and the
    count are then not read back from the code (no host read of device data)."""
    if code.numel() == 0:
        raise ValueError("index code: empty (the tag byte is missing)")
    tag, body = (int(code[0]) if form is None else form[0]), code[1:]
    if tag == _FIXED:
        w = _width(n)
        return unpack_bits(body, w, body.numel() * 8 // w)
    if tag == _BITMAP:
        bits = unpack_bits(body, 1, n)
        if form is not None:
            return torch.nonzero_static(bits, size=form[1]).squeeze(1)
        return bits.nonzero().squeeze(1)
    if tag == _DELTA:
        return _delta_decode(body, None if form is None else form[1])
    raise ValueError(f"index code: unknown tag {tag}")
