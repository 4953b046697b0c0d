"""The CPU backend: the C kernels of :mod:`commhooks.native`, called through ctypes."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from commhooks import native
from commhooks.kernels.backend import Backend, Finite, Stats

__all__ = ["NativeBackend"]


class NativeBackend(Backend):
    """fp32 contiguous CPU tensors of at least :data:`commhooks.native.MIN_NUMEL` elements,
    when the library builds (see :mod:`commhooks.native`)."""

    name: ClassVar[str] = "native"
    provides: ClassVar[frozenset[str]] = frozenset(
        {
            "sign",
            "uniform",
            "stochastic",
            "table",
            "cast",
            "stats",
            "select",
            "varint",
            "symm",
        }
    )

    def usable(self, *tensors: Tensor, numel: int | None = None, op: str = "") -> bool:
        if op == "varint":
            # No size floor: the torch index code costs more than a ctypes call at any size.
            return native.indices_ok(*tensors)
        return native.usable(*tensors, numel=numel)

    def select_at_least(
        self, g: Tensor, e: Tensor | None, threshold: float
    ) -> tuple[Tensor, Tensor, bool]:
        return native.select_at_least(g, e, threshold)

    def varint_encode(self, idx: Tensor) -> Tensor:
        return native.varint_encode(idx)

    def varint_decode(self, body: Tensor) -> Tensor:
        return native.varint_decode(body)

    def chunk_stats(
        self, g: Tensor, e: Tensor | None, chunk: int, minmax: bool = False,
        squares: bool = False, pivot: float | None = None, host: bool = True,
    ) -> Stats:  # fmt: skip
        # Host floats either way: the C kernel returns them, with no device to read.
        return native.chunk_stats(g, e, chunk, minmax, squares, pivot)

    def sign_encode(self, g: Tensor, e: Tensor | None, chunk: int, scale: Tensor) -> Tensor:
        return native.sign_encode(g, e, chunk, scale)

    def sign_decode(
        self, bits: Tensor, n: int, chunk: int, scale: Tensor, out: Tensor | None
    ) -> Tensor:
        return native.sign_decode(bits, n, chunk, scale, out)

    def uniform_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, lo: Tensor, step: Tensor, bits: int,
        seed: int | None = None,
    ) -> Tensor:  # fmt: skip
        return native.uniform_encode(g, e, chunk, lo, step, bits, seed)

    def uniform_decode(
        self, data: Tensor, n: int, chunk: int, lo: Tensor, step: Tensor, bits: int,
        out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        return native.uniform_decode(data, n, chunk, lo, step, bits, out)

    def stochastic_encode(
        self, kind: int, g: Tensor, e: Tensor | None, chunk: int, norm: Tensor, levels: int,
        alphabet: int, packing: tuple[int, int], seed: int,
    ) -> Tensor:  # fmt: skip
        return native.stochastic_encode(kind, g, e, chunk, norm, levels, alphabet, packing, seed)

    def stochastic_decode(
        self, data: Tensor, n: int, chunk: int, norm: Tensor, levels: int, alphabet: int,
        packing: tuple[int, int], out: Tensor | None, kind: int = 0,
    ) -> Tensor:  # fmt: skip
        return native.stochastic_decode(data, n, chunk, norm, levels, alphabet, packing, out, kind)

    def table_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, scale: Tensor, mids: Tensor,
        levels: Tensor, bits: int,
    ) -> Tensor:  # fmt: skip
        return native.table_encode(g, e, chunk, scale, mids, levels, bits)

    def table_decode(
        self, data: Tensor, n: int, chunk: int, scale: Tensor, mids: Tensor, levels: Tensor,
        bits: int, out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        return native.table_decode(data, n, chunk, scale, mids, levels, bits, out)

    def casts(self, dtype: torch.dtype) -> bool:
        return native.casts(dtype)

    def cast_encode(self, g: Tensor, e: Tensor | None, scale: float, out: Tensor) -> Finite:
        return native.cast_encode(g, e, scale, out)

    def cast_residual(
        self, g: Tensor, e: Tensor, scale: float, sent: Tensor, decay: float, finite: Finite
    ) -> None:
        if finite:
            native.cast_residual(g, e, scale, sent, decay)

    def cast_decode(
        self, half: Tensor, scale: float, out: Tensor | None = None, divisor: float = 1.0
    ) -> Tensor:
        return native.cast_decode(half, scale, out, divisor)

    def symm_absmax(self, g: Tensor, e: Tensor | None, chunk: int) -> Tensor:
        return native.symm_absmax(g, e, chunk)

    def symm_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, step: Tensor, level: int, codes: Tensor
    ) -> None:
        native.symm_encode(g, e, chunk, step, level, codes)

    def symm_residual(
        self, g: Tensor, e: Tensor, chunk: int, step: Tensor, codes: Tensor, decay: float
    ) -> None:
        native.symm_residual(g, e, chunk, step, codes, decay)

    def symm_decode(
        self, codes: Tensor, chunk: int, step: Tensor, divisor: float, out: Tensor
    ) -> None:
        native.symm_decode(codes, chunk, step, divisor, out)
