"""The device backend: the Triton kernels of :mod:`._triton_codecs` and :mod:`._triton_flat`
behind the :class:`~commhooks.kernels.backend.Backend` interface.

It serves CUDA tensors, and CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
what :mod:`~commhooks.kernels.dispatch` sets for ``COMMHOOKS_KERNELS=triton``): the same
kernel source, run element for element in numpy, which is how it is tested without a GPU.

Per encode: one statistics kernel, a few tiny torch ops on the per-chunk partials, one host
read of two scalars (whether ``c`` is finite, and its largest magnitude, since the codecs
refuse values that could overflow their residual; none in a step decided on the device), and
one encode kernel. The last ``n % 8``
codes of a bit-packed payload (a bit matrix in :func:`commhooks.coding.bitpack.pack_bits`)
are packed by torch on the device.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch import Tensor

from commhooks.coding.bitpack import _pack_tail, _planes, _unpack_tail, packed_size
from commhooks.kernels import _triton_codecs as tk
from commhooks.kernels import _triton_flat as tf
from commhooks.kernels.backend import Backend, Finite, Stats

__all__ = ["TritonBackend"]

# Groups (bytes of radix codes, or runs of 8 codes) per program: 8192 codes a tile.
_NB = 1024
# Elements per statistics program; chunks larger than this are split across programs.
_STATS_BLOCK = 4096
# Elements per program of the elementwise kernels (casts, finiteness flags).
_FLAT_BLOCK = 4096
# Kinds of _triton_codecs.encode_kernel.
_SIGN, _UNIFORM, _UNIFORM_ST, _QSGD, _TERNARY, _GRID = range(6)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_options() -> dict[str, object]:
    # No fused multiply-adds beyond the explicit one: the C kernels' rounding, bit for bit.
    return {} if _interpreting() else {"enable_fp_fusion": False}


def _widths(bits: int) -> dict[str, int]:
    """The kernels' plane widths ``W0..W3`` for ``bits``-bit codes (0: no such plane)."""
    ws = [w for _, w in _planes(bits)] + [0, 0, 0, 0]
    return {f"W{i}": ws[i] for i in range(4)}


class TritonBackend(Backend):
    """fp32 contiguous tensors on a CUDA device (any size), or on the CPU when Triton
    interprets."""

    name: ClassVar[str] = "triton"
    provides: ClassVar[frozenset[str]] = frozenset(
        {"sign", "uniform", "stochastic", "cast", "sparse-feedback"}
    )

    def usable(self, *tensors: Tensor, numel: int | None = None, op: str = "") -> bool:
        if not tensors:
            return False
        device = tensors[0].device
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return False
        for t in tensors:
            if t.device != device or not t.is_contiguous():
                return False
            if t.is_floating_point() and t.dtype != torch.float32:
                return False
        return (tensors[0].numel() if numel is None else numel) > 0

    # -- statistics ---------------------------------------------------------------------------

    def chunk_stats(
        self, g: Tensor, e: Tensor | None, chunk: int, minmax: bool = False,
        squares: bool = False, pivot: float | None = None, host: bool = True,
    ) -> Stats:  # fmt: skip
        n = g.numel()
        nchunks = -(-n // chunk)
        block = min(_STATS_BLOCK, max(16, 1 << (chunk - 1).bit_length()))
        sub = -(-chunk // block)
        items = nchunks * sub
        part = torch.empty((5, items), dtype=torch.float32, device=g.device)
        tk.stats_kernel[(items,)](
            g, g if e is None else e, n, chunk, sub, part[0], part[1], part[2], part[3], part[4],
            0.0 if pivot is None else float(pivot), HAS_E=e is not None,
            SIGNED=pivot is not None, BLOCK=block,
        )  # fmt: skip
        rows = part.view(5, nchunks, sub)
        sums = rows[0].double().sum(1)
        sq = rows[1].double().sum(1) if squares else None
        lo = rows[3].amin(1) if minmax else None
        hi = rows[4].amax(1) if minmax else None
        both = torch.stack([sums.sum(), rows[2].max().double()])
        if not host:  # a step decided on the device: nothing read back
            return Stats(sums, sq, lo, hi, both[0], both[1])
        # The one host read of an encode: whether c is finite and safely small.
        total, amax = both.tolist()
        return Stats(sums, sq, lo, hi, total, amax)

    # -- codecs -------------------------------------------------------------------------------

    def _encode(
        self, kind: int, g: Tensor, e: Tensor | None, chunk: int, p0: Tensor, p1: Tensor,
        levels: int, bits: int, radix: int, alphabet: int, seed: int | None,
    ) -> Tensor:  # fmt: skip
        n = g.numel()
        nbytes = packed_size(n, (bits, radix))
        data = torch.empty(nbytes, dtype=torch.uint8, device=g.device)
        body = n - n % 8
        tail = torch.zeros(8, dtype=torch.uint8, device=g.device)
        groups = nbytes if radix else -(-n // 8)
        s = 0 if seed is None else seed
        tk.encode_kernel[(-(-groups // _NB),)](
            g, g if e is None else e, data, tail, p0, p1, n, chunk, body, nbytes,
            s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF, HAS_E=e is not None, KIND=kind,
            LEVELS=levels, RADIX=radix, ALPHABET=alphabet, NB=_NB, **_widths(bits or 8),
            **_launch_options(),
        )  # fmt: skip
        if not radix and body < n:
            data[body // 8 * bits :] = _pack_tail(tail[: n - body], bits)
        return data

    def _decode(
        self, kind: int, data: Tensor, n: int, chunk: int, p0: Tensor, p1: Tensor, levels: int,
        bits: int, radix: int, alphabet: int, out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        acc = out is not None
        out = out if out is not None else torch.empty(n, dtype=torch.float32, device=data.device)
        body = n - n % 8
        if not radix and body < n:
            tail = _unpack_tail(data[body // 8 * bits :], bits, n - body).to(torch.uint8)
        else:
            tail = data  # not read
        groups = data.numel() if radix else -(-n // 8)
        tk.decode_kernel[(-(-groups // _NB),)](
            data, tail, out, p0, p1, n, chunk, body, ACC=acc, KIND=kind, LEVELS=levels,
            RADIX=radix, ALPHABET=alphabet, NB=_NB, **_widths(bits or 8), **_launch_options(),
        )  # fmt: skip
        return out

    def sign_encode(self, g: Tensor, e: Tensor | None, chunk: int, scale: Tensor) -> Tensor:
        return self._encode(_SIGN, g, e, chunk, scale, scale, 1, 1, 0, 2, None)

    def sign_decode(
        self, bits: Tensor, n: int, chunk: int, scale: Tensor, out: Tensor | None
    ) -> Tensor:
        return self._decode(_SIGN, bits, n, chunk, scale, scale, 1, 1, 0, 2, out)

    def uniform_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, lo: Tensor, step: Tensor, bits: int,
        seed: int | None = None,
    ) -> Tensor:  # fmt: skip
        kind = _UNIFORM if seed is None else _UNIFORM_ST
        top = (1 << bits) - 1
        return self._encode(kind, g, e, chunk, lo, step, top, bits, 0, top + 1, seed)

    def uniform_decode(
        self, data: Tensor, n: int, chunk: int, lo: Tensor, step: Tensor, bits: int,
        out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        top = (1 << bits) - 1
        return self._decode(_UNIFORM, data, n, chunk, lo, step, top, bits, 0, top + 1, out)

    def stochastic_encode(
        self, kind: int, g: Tensor, e: Tensor | None, chunk: int, norm: Tensor, levels: int,
        alphabet: int, packing: tuple[int, int], seed: int,
    ) -> Tensor:  # fmt: skip
        bits, radix = packing
        rule = (_QSGD, _TERNARY, _GRID)[kind]
        return self._encode(rule, g, e, chunk, norm, norm, levels, bits, radix, alphabet, seed)

    def stochastic_decode(
        self, data: Tensor, n: int, chunk: int, norm: Tensor, levels: int, alphabet: int,
        packing: tuple[int, int], out: Tensor | None, kind: int = 0,
    ) -> Tensor:  # fmt: skip
        bits, radix = packing
        rule = (_QSGD, _TERNARY, _GRID)[kind]
        return self._decode(rule, data, n, chunk, norm, norm, levels, bits, radix, alphabet, out)

    # -- casts --------------------------------------------------------------------------------

    def casts(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float16, torch.bfloat16)

    def cast_encode(self, g: Tensor, e: Tensor | None, scale: float, out: Tensor) -> Finite:
        """The flag stays on the device: 0-d bool, True where every cast is finite."""
        n = g.numel()
        bad = torch.zeros(1, dtype=torch.int32, device=g.device)
        tf.cast_encode_kernel[(-(-n // _FLAT_BLOCK),)](
            g, g if e is None else e, out.view(torch.int16), bad, n, float(scale),
            HAS_E=e is not None, BF16=out.dtype == torch.bfloat16, BLOCK=_FLAT_BLOCK,
            **_launch_options(),
        )  # fmt: skip
        return bad

    def cast_residual(
        self, g: Tensor, e: Tensor, scale: float, sent: Tensor, decay: float, finite: Finite
    ) -> None:
        if isinstance(finite, bool):
            if not finite:
                return
            finite = torch.zeros(1, dtype=torch.int32, device=g.device)
        n = g.numel()
        tf.cast_residual_kernel[(-(-n // _FLAT_BLOCK),)](
            g, e, sent.view(torch.int16), finite, n, float(scale), float(decay),
            BF16=sent.dtype == torch.bfloat16, BLOCK=_FLAT_BLOCK, **_launch_options(),
        )  # fmt: skip

    def cast_decode(
        self, half: Tensor, scale: float, out: Tensor | None = None, divisor: float = 1.0
    ) -> Tensor:
        n = half.numel()
        out = out if out is not None else torch.empty(n, dtype=torch.float32, device=half.device)
        tf.cast_decode_kernel[(-(-n // _FLAT_BLOCK),)](
            half.view(torch.int16), out, n, float(scale), float(divisor),
            BF16=half.dtype == torch.bfloat16, BLOCK=_FLAT_BLOCK, **_launch_options(),
        )  # fmt: skip
        return out

    # -- sparsifiers' error feedback ----------------------------------------------------------

    def finite_flag(self, g: Tensor, e: Tensor) -> Tensor:
        n = g.numel()
        bad = torch.zeros(1, dtype=torch.int32, device=g.device)
        tf.nonfinite_kernel[(-(-n // _FLAT_BLOCK),)](g, e, bad, n, BLOCK=_FLAT_BLOCK)
        return bad

    def compensate(self, g: Tensor, e: Tensor, finite: Tensor, decay: float) -> None:
        n = g.numel()
        tf.compensate_kernel[(-(-n // _FLAT_BLOCK),)](
            g, e, finite, n, float(decay), BLOCK=_FLAT_BLOCK, **_launch_options()
        )
