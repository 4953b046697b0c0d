"""What a kernel backend offers: the fused codec operations, on one kind of device.

Every backend takes the same arguments and writes the same bytes (the layouts of
:mod:`commhooks.coding.bitpack`), so a payload encoded by one decodes with any other or with
the torch reference code in the compressors. A backend says which operations it has
(:attr:`Backend.provides`); a codec whose operations it lacks keeps the torch path.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from commhooks.coding.bitpack import symbol_packing
from commhooks.native import Stats

__all__ = ["Backend", "Finite", "Stats", "host_finite"]

#: whether a cast was finite: a host bool, or a device flag (int32, nonzero where some cast
#: was not) that the residual kernel reads without a host read
Finite = bool | Tensor


def host_finite(finite: Finite) -> bool:
    """``finite`` as a host bool (one host read for a device flag)."""
    return finite if isinstance(finite, bool) else int(finite.reshape(-1)[0]) == 0


class Backend:
    """Base of the kernel backends (:mod:`commhooks.kernels.dispatch` picks one per device).

    Operations take flat fp32 tensors (``g`` the gradient, ``e`` the residual or None,
    updated in place to ``c - decode(code)`` where given) and trust their sizes: the codecs
    check them first. Decoders add into ``out`` when it is given.
    """

    #: a short name for logs and reports ("native", "triton")
    name: ClassVar[str] = ""
    #: the operations this backend implements (method names below)
    provides: ClassVar[frozenset[str]] = frozenset()

    def usable(self, *tensors: Tensor, numel: int | None = None, op: str = "") -> bool:
        """Whether this backend takes these tensors (device, dtype, layout, size) for ``op``."""
        raise NotImplementedError

    # -- selection and index codes -------------------------------------------------------------

    def select_at_least(
        self, g: Tensor, e: Tensor | None, threshold: float
    ) -> tuple[Tensor, Tensor, bool]:
        """Positions (ascending int64) and values of ``c = g + e`` with ``!(|c| < threshold)``
        in one pass that writes nothing; and whether every collected ``c`` is finite."""
        raise NotImplementedError

    def varint_encode(self, idx: Tensor) -> Tensor:
        """LEB128 varints of the gaps between sorted int64 ``idx`` (the delta index code)."""
        raise NotImplementedError

    def varint_decode(self, body: Tensor) -> Tensor:
        """Inverse of :meth:`varint_encode`; ValueError for a cut-off or overlong varint."""
        raise NotImplementedError

    def chunk_stats(
        self, g: Tensor, e: Tensor | None, chunk: int, minmax: bool = False,
        squares: bool = False, pivot: float | None = None, host: bool = True,
    ) -> Stats:  # fmt: skip
        """Per-chunk statistics of ``c = g + e`` (see :func:`commhooks.native.chunk_stats`);
        ``total`` and ``amax`` are host floats (the one host read of a fused encode), or
        with ``host=False`` may stay 0-d device tensors (a step decided on the device)."""
        raise NotImplementedError

    def sign_encode(self, g: Tensor, e: Tensor | None, chunk: int, scale: Tensor) -> Tensor:
        raise NotImplementedError

    def sign_decode(
        self, bits: Tensor, n: int, chunk: int, scale: Tensor, out: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    def uniform_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, lo: Tensor, step: Tensor, bits: int,
        seed: int | None = None,
    ) -> Tensor:  # fmt: skip
        raise NotImplementedError

    def uniform_decode(
        self, data: Tensor, n: int, chunk: int, lo: Tensor, step: Tensor, bits: int,
        out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        raise NotImplementedError

    def stochastic_encode(
        self, kind: int, g: Tensor, e: Tensor | None, chunk: int, norm: Tensor, levels: int,
        alphabet: int, packing: tuple[int, int], seed: int,
    ) -> Tensor:  # fmt: skip
        raise NotImplementedError

    def stochastic_decode(
        self, data: Tensor, n: int, chunk: int, norm: Tensor, levels: int, alphabet: int,
        packing: tuple[int, int], out: Tensor | None, kind: int = 0,
    ) -> Tensor:  # fmt: skip
        raise NotImplementedError

    def grid_encode(self, g: Tensor, e: Tensor | None, grid: Tensor, bits: int) -> Tensor:
        """Nearest codes on the ``2**bits`` levels ``mid + (2k - top) * half`` (``grid`` =
        ``[mid, half]``): :meth:`stochastic_encode` of kind 2 (see
        :func:`commhooks.native.grid_encode`)."""
        top = (1 << bits) - 1
        packing = symbol_packing(top + 1)
        return self.stochastic_encode(2, g, e, g.numel(), grid, top, top + 1, packing, 0)

    def table_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, scale: Tensor, mids: Tensor,
        levels: Tensor, bits: int,
    ) -> Tensor:  # fmt: skip
        raise NotImplementedError

    def table_decode(
        self, data: Tensor, n: int, chunk: int, scale: Tensor, mids: Tensor, levels: Tensor,
        bits: int, out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        raise NotImplementedError

    # -- casts (fp16, bf16) -------------------------------------------------------------------

    def casts(self, dtype: torch.dtype) -> bool:
        """Whether the cast kernels serve this wire dtype."""
        return False

    def cast_encode(self, g: Tensor, e: Tensor | None, scale: float, out: Tensor) -> Finite:
        """``out = half((g + e) * scale)``; writes nothing else. Returns whether every
        ``out`` (and, for bf16, ``out / scale``) is finite, as a :data:`Finite`."""
        raise NotImplementedError

    def cast_residual(
        self, g: Tensor, e: Tensor, scale: float, sent: Tensor, decay: float, finite: Finite
    ) -> None:
        """``e = ((g + e) - float(sent) / scale) * decay`` in place, where ``finite`` (from
        :meth:`cast_encode`) says the cast was finite; else ``e`` stays as it was."""
        raise NotImplementedError

    def cast_decode(
        self, half: Tensor, scale: float, out: Tensor | None = None, divisor: float = 1.0
    ) -> Tensor:
        """``float(half) / scale / divisor`` as fp32, into ``out`` when given."""
        raise NotImplementedError

    # -- shared-scale symmetric codes (uniform, shared_scale=True) ------------------------------

    def symm_absmax(self, g: Tensor, e: Tensor | None, chunk: int) -> Tensor:
        """Per-chunk ``max |g + e|`` (fp32), +inf for a chunk holding a NaN (the MAX round's
        message)."""
        raise NotImplementedError

    def symm_encode(
        self, g: Tensor, e: Tensor | None, chunk: int, step: Tensor, level: int, codes: Tensor
    ) -> None:
        """``codes`` (an int8/16/32 tensor) = ``clamp(round(c / step), -level, level)`` of
        ``c = g + e`` with one ``step`` per chunk, a NaN quotient as 0; writes nothing else."""
        raise NotImplementedError

    def symm_residual(
        self, g: Tensor, e: Tensor, chunk: int, step: Tensor, codes: Tensor, decay: float
    ) -> None:
        """``e = ((g + e) - float(codes) * step) * decay`` in place, from the ``codes`` that
        :meth:`symm_encode` wrote for these ``g`` and ``e``."""
        raise NotImplementedError

    def symm_decode(
        self, codes: Tensor, chunk: int, step: Tensor, divisor: float, out: Tensor
    ) -> None:
        """``out = (float(codes) * step) / divisor`` (summed codes to a mean)."""
        raise NotImplementedError

    # -- sparsifiers' error feedback on a device ------------------------------------------------

    def finite_flag(self, g: Tensor, e: Tensor) -> Tensor:
        """A device flag (int32, nonzero where some ``g + e`` is not finite), no host read."""
        raise NotImplementedError

    def compensate(self, g: Tensor, e: Tensor, finite: Tensor, decay: float) -> None:
        """``e = (g + e) * decay`` in place where the flag says finite; else ``e`` stays."""
        raise NotImplementedError
