"""Triton kernels of the quantizer codecs (imported only by :mod:`.triton_backend`).

One encode and one decode kernel serve every codec: each program takes a tile of ``NB``
groups of elements, a group being one byte's worth of a radix code (``RADIX`` symbols) or
eight codes (whose bits fill ``BITS`` bytes, spread over the bit planes of
:func:`commhooks.coding.bitpack.pack_bits`). ``KIND`` picks the element rule, a constant
folded at compile time, so each codec compiles to its own branch-free kernel:

    0 sign, 1 uniform nearest, 2 uniform stochastic, 3 QSGD, 4 TernGrad, 5 adaptive's grid

Every float expression is the one ``commhooks/native/codecs.c`` evaluates (IEEE division
``div_rn``, the one explicit ``fma`` of the grid; launched with ``enable_fp_fusion=False`` so
the compiler adds no other), and the rounding noise is the same counter hash, so the bytes
are the C kernels' bytes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["decode_kernel", "encode_kernel", "stats_kernel"]


@triton.jit
def _uniform01(idx, s0, s1):
    """codecs.c's uniform01: one lowbias32 round over the seeded element counter."""
    lo = idx.to(tl.uint32) ^ s0.to(tl.uint32)
    hi = (idx.to(tl.int64) >> 32).to(tl.uint32) ^ s1.to(tl.uint32)
    x = lo + hi * 0x9E3779B9
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _rint(q):
    """Round half to even, as C's nearbyintf: floor(q + 0.5) rounds q + 0.5 itself."""
    f = tl.floor(q)
    d = q - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd) | (d != d)  # d is NaN only for q = +-inf
    return tl.where(up, f + 1.0, f)


@triton.jit
def _clamp(q, top):
    return tl.where(q < 0.0, 0.0, tl.where(q > top, top, q))


@triton.jit
def _encode_one(v, idx, ci, m, p0, p1, s0, s1, KIND: tl.constexpr, LEVELS: tl.constexpr):
    """(code, decoded value) of ``v`` (as fp32) under rule ``KIND``; ``ci`` its chunk."""
    top = LEVELS * 1.0
    if KIND == 0:
        sc = tl.load(p0 + ci, mask=m, other=1.0)
        pos = v >= 0.0
        code = tl.where(pos, 1.0, 0.0)
        val = tl.where(pos, sc, -sc)
    elif KIND == 1 or KIND == 2:
        lo = tl.load(p0 + ci, mask=m, other=0.0)
        step = tl.load(p1 + ci, mask=m, other=1.0)
        q = tl.div_rn(v - lo, step)
        q = tl.where(q == q, q, 0.0)  # 0/0 in a constant chunk
        if KIND == 1:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            q = _rint(q)
        else:
            q = tl.floor(q + _uniform01(idx, s0, s1))
        code = _clamp(q, top)
        val = code * step + lo
    elif KIND == 3 or KIND == 4:
        nrm = tl.load(p0 + ci, mask=m, other=1.0)
        step = tl.div_rn(nrm, top)
        r = tl.abs(v) * tl.div_rn(top, nrm)
        r = _clamp(tl.where(r == r, r, 0.0), top)  # 0/0 in an all-zero chunk
        u = _uniform01(idx, s0, s1)
        if KIND == 3:
            lv = tl.floor(r + u)
            lv = tl.where(lv > top, top, lv)
        else:
            lv = tl.where(u < r, 1.0, 0.0)
        code = tl.where(v < 0.0, -lv, lv) + top
        val = (code - top) * step
    else:
        mid = tl.load(p0)
        half = tl.load(p0 + 1)
        q = (tl.div_rn(v - mid, half) + top) * 0.5
        code = _clamp(_rint(tl.where(q == q, q, 0.0)), top)
        val = tl.fma(2.0 * code - top, half, mid)
    return code, val


@triton.jit
def _value(code, ci, m, p0, p1, KIND: tl.constexpr, LEVELS: tl.constexpr):
    """What a code decodes to: the value :func:`_encode_one` returns with it."""
    top = LEVELS * 1.0
    if KIND == 0:
        sc = tl.load(p0 + ci, mask=m, other=1.0)
        val = tl.where(code != 0.0, sc, -sc)
    elif KIND == 1 or KIND == 2:
        lo = tl.load(p0 + ci, mask=m, other=0.0)
        step = tl.load(p1 + ci, mask=m, other=1.0)
        val = code * step + lo
    elif KIND == 3 or KIND == 4:
        nrm = tl.load(p0 + ci, mask=m, other=1.0)
        val = (code - top) * tl.div_rn(nrm, top)
    else:
        val = tl.fma(2.0 * code - top, tl.load(p0 + 1), tl.load(p0))
    return val


@triton.jit
def _radix_weights(j, ALPHABET: tl.constexpr):
    w = tl.full(j.shape, 1, tl.int32)
    for t in tl.static_range(1, 8):
        w = tl.where(j >= t, w * ALPHABET, w)
    return w


@triton.jit
def _plane_store(data, codes, grp, body_groups, OFF: tl.constexpr, W: tl.constexpr,
                 NB: tl.constexpr, body):  # fmt: skip
    """Store the bit plane (OFF, W) of a tile of 8-code groups: plane bytes start at
    ``body / 8 * OFF`` and hold ``8 / W`` codes each, low bits first."""
    if W > 0:
        per: tl.constexpr = 8 // W
        bits = ((codes >> OFF) & ((1 << W) - 1)) << ((tl.arange(0, 8) % per) * W)[None, :]
        byte = tl.sum(tl.reshape(bits, (NB * W, per)), axis=1)
        pos = tl.reshape(grp[:, None] * W + tl.arange(0, W)[None, :], (NB * W,))
        okg = tl.reshape((grp < body_groups)[:, None] & (tl.arange(0, W) >= 0)[None, :], (NB * W,))
        tl.store(data + (body // 8) * OFF + pos, byte.to(tl.uint8), mask=okg)


@triton.jit
def _plane_load(data, grp, body_groups, OFF: tl.constexpr, W: tl.constexpr, body):
    """The plane (OFF, W) bits of each code in a tile of 8-code groups, shifted into place."""
    if W > 0:
        per: tl.constexpr = 8 // W
        j = tl.arange(0, 8)[None, :]
        ok = (grp < body_groups)[:, None] & (j >= 0)
        byte = tl.load(data + (body // 8) * OFF + grp[:, None] * W + j // per, mask=ok, other=0)
        return ((byte.to(tl.int32) >> ((j % per) * W)) & ((1 << W) - 1)) << OFF
    else:
        return tl.zeros((grp.shape[0], 8), tl.int32)


# The seed halves are plain integers to the kernel: a value of 1 must not be specialized into
# a constant (which has no .to()).
@triton.jit(do_not_specialize=["s0", "s1"])
def encode_kernel(
    g, e, data, tail, p0, p1, n, chunk, body, nbytes, s0, s1,
    HAS_E: tl.constexpr, KIND: tl.constexpr, LEVELS: tl.constexpr, RADIX: tl.constexpr,
    ALPHABET: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    W3: tl.constexpr, NB: tl.constexpr,
):  # fmt: skip
    """Codes of ``c = g + e`` packed into ``data`` (codes past ``body`` into ``tail``, for
    the host to pack as a bit matrix), and with ``HAS_E`` the residual ``c - value``."""
    group: tl.constexpr = RADIX if RADIX > 0 else 8
    grp = tl.program_id(0) * NB + tl.arange(0, NB)
    j = tl.arange(0, 8)[None, :]
    idx = grp[:, None] * group + j
    m = (idx < n) & (j < group)
    v = tl.load(g + idx, mask=m, other=0.0)
    if HAS_E:
        v = v + tl.load(e + idx, mask=m, other=0.0)
    ci = idx // chunk
    code, val = _encode_one(v, idx, ci, m, p0, p1, s0, s1, KIND, LEVELS)
    if HAS_E:
        tl.store(e + idx, v - val, mask=m)
    c = tl.where(m, code, 0.0).to(tl.int32)  # zero padding, as the torch packer's
    if RADIX > 0:
        byte = tl.sum(c * _radix_weights(j, ALPHABET), axis=1)
        tl.store(data + grp, byte.to(tl.uint8), mask=grp < nbytes)
    else:
        bg = body // 8
        _plane_store(data, c, grp, bg, 0, W0, NB, body)
        _plane_store(data, c, grp, bg, W0, W1, NB, body)
        _plane_store(data, c, grp, bg, W0 + W1, W2, NB, body)
        _plane_store(data, c, grp, bg, W0 + W1 + W2, W3, NB, body)
        tl.store(tail + (idx - body), c.to(tl.uint8), mask=m & (idx >= body))


@triton.jit
def decode_kernel(
    data, tail, out, p0, p1, n, chunk, body, ACC: tl.constexpr, KIND: tl.constexpr,
    LEVELS: tl.constexpr, RADIX: tl.constexpr, ALPHABET: tl.constexpr, W0: tl.constexpr,
    W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr, NB: tl.constexpr,
):  # fmt: skip
    """Decode packed codes (those past ``body`` from ``tail``) into ``out``, added with
    ``ACC``."""
    group: tl.constexpr = RADIX if RADIX > 0 else 8
    grp = tl.program_id(0) * NB + tl.arange(0, NB)
    j = tl.arange(0, 8)[None, :]
    idx = grp[:, None] * group + j
    m = (idx < n) & (j < group)
    if RADIX > 0:
        byte = tl.load(data + grp, mask=grp * group < n, other=0).to(tl.int32)
        code = (byte[:, None] // _radix_weights(j, ALPHABET)) % ALPHABET
    else:
        bg = body // 8
        code = _plane_load(data, grp, bg, 0, W0, body)
        code |= _plane_load(data, grp, bg, W0, W1, body)
        code |= _plane_load(data, grp, bg, W0 + W1, W2, body)
        code |= _plane_load(data, grp, bg, W0 + W1 + W2, W3, body)
        late = m & (idx >= body)
        code = tl.where(late, tl.load(tail + (idx - body), mask=late, other=0).to(tl.int32), code)
    val = _value(code.to(tl.float32), idx // chunk, m, p0, p1, KIND, LEVELS)
    if ACC:
        val = val + tl.load(out + idx, mask=m, other=0.0)
    tl.store(out + idx, val, mask=m)


@triton.jit
def stats_kernel(
    g, e, n, chunk, sub, sums, sqs, amax, lo, hi, pivot,
    HAS_E: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial statistics of ``c = g + e`` over block ``it % sub`` of chunk ``it // sub``:
    sum of |c| (of ``c - pivot`` with ``SIGNED``), sum of ``(c - pivot)**2``, max |c|, min
    and max; the host gathers the blocks of each chunk."""
    it = tl.program_id(0)
    c = it // sub
    b = it % sub
    r = b * BLOCK + tl.arange(0, BLOCK)
    idx = c.to(tl.int64) * chunk + r
    m = (idx < n) & (r < chunk)
    v = tl.load(g + idx, mask=m, other=0.0)
    if HAS_E:
        v = v + tl.load(e + idx, mask=m, other=0.0)
    d = v - pivot
    mag = tl.abs(v)
    if SIGNED:
        tl.store(sums + it, tl.sum(tl.where(m, d, 0.0), axis=0))
    else:
        tl.store(sums + it, tl.sum(tl.where(m, mag, 0.0), axis=0))
    tl.store(sqs + it, tl.sum(tl.where(m, d * d, 0.0), axis=0))
    tl.store(amax + it, tl.max(tl.where(m, mag, 0.0), axis=0))
    tl.store(lo + it, tl.min(tl.where(m, v, float("inf")), axis=0))
    tl.store(hi + it, tl.max(tl.where(m, v, float("-inf")), axis=0))
