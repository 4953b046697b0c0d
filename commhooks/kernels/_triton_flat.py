"""Elementwise Triton kernels of error feedback (imported only by :mod:`.triton_backend`).

The casts' encode, residual and decode, bit for bit as ``commhooks/native/codecs.c`` computes
them, and the finiteness flag and masked residual update of random-k's fused exchange. A
kernel that may find a non-finite value raises a flag on the device (an int32, by atomic
max); the residual kernels read that flag and leave the residual alone where it is raised, so
a fused exchange on a device reads nothing back.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "cast_decode_kernel",
    "cast_encode_kernel",
    "cast_residual_kernel",
    "compensate_kernel",
    "nonfinite_kernel",
]


@triton.jit
def _half_bits(c, BF16: tl.constexpr):
    """The 16 wire bits of ``c`` (int32): bf16 rounded to nearest even by integer work, as
    codecs.c and torch round it (NaN: torch's quiet NaN), or IEEE fp16."""
    if BF16:
        u = c.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int32)
        bits = tl.where(c != c, 0x7FC0, r)
    else:
        bits = c.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits


@triton.jit
def _half_value(bits, BF16: tl.constexpr):
    """The fp32 value of 16 wire bits (int32)."""
    if BF16:
        val = (bits << 16).to(tl.float32, bitcast=True)
    else:
        val = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return val


@triton.jit
def cast_encode_kernel(
    g, e, h, bad, n, s, HAS_E: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr
):
    """``h = half((g + e) * s)`` (``h`` an int16 view of the wire); ``bad`` (int32) set to 1
    if some ``h`` is not finite (bf16: or ``h / s`` overflows fp32)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c = tl.load(g + i, mask=m, other=0.0)
    if HAS_E:
        c = c + tl.load(e + i, mask=m, other=0.0)
    bits = _half_bits(c * s, BF16)
    tl.store(h + i, bits.to(tl.int16), mask=m)
    if BF16:
        sent = tl.div_rn(_half_value(bits, BF16), s)
        wrong = ((bits & 0x7F80) == 0x7F80) | ~(tl.abs(sent) <= 3.4028234663852886e38)
    else:
        wrong = (bits & 0x7C00) == 0x7C00
    tl.atomic_max(bad, tl.max(tl.where(m & wrong, 1, 0), axis=0))


@triton.jit
def cast_residual_kernel(g, e, h, bad, n, s, decay, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """``e = ((g + e) - float(h) / s) * decay``, unless ``bad`` (from the encode) says the
    cast was not finite: the residual is then left as it was, with no host read."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = (i < n) & (tl.load(bad + i * 0) == 0)  # the flag, broadcast to every lane
    c = tl.load(g + i, mask=m, other=0.0) + tl.load(e + i, mask=m, other=0.0)
    sent = tl.div_rn(_half_value(tl.load(h + i, mask=m, other=0).to(tl.int32) & 0xFFFF, BF16), s)
    tl.store(e + i, (c - sent) * decay, mask=m)


@triton.jit
def cast_decode_kernel(h, out, n, s, w, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """``out = float(h) / s / w`` (two divisions, as the torch ops round them)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = _half_value(tl.load(h + i, mask=m, other=0).to(tl.int32) & 0xFFFF, BF16)
    tl.store(out + i, tl.div_rn(tl.div_rn(v, s), w), mask=m)


@triton.jit
def nonfinite_kernel(g, e, bad, n, BLOCK: tl.constexpr):
    """Raise ``bad`` (int32) if some ``g + e`` is not finite: exactly, whatever the
    magnitudes (a sum could overflow first)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c = tl.load(g + i, mask=m, other=0.0) + tl.load(e + i, mask=m, other=0.0)
    wrong = (c != c) | (tl.abs(c) == float("inf"))
    tl.atomic_max(bad, tl.max(tl.where(m & wrong, 1, 0), axis=0))


@triton.jit
def compensate_kernel(g, e, bad, n, decay, BLOCK: tl.constexpr):
    """``e = (g + e) * decay`` where ``bad`` is 0, else ``e`` untouched: the residual of a
    sparsifier that sends exact values, before the sent elements are cleared."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = (i < n) & (tl.load(bad + i * 0) == 0)
    c = tl.load(g + i, mask=m, other=0.0) + tl.load(e + i, mask=m, other=0.0)
    tl.store(e + i, c * decay, mask=m)
