"""Helpers shared by the quantizers: per-chunk views of a flat tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NativeKernels", "chunked", "unchunk"]


class NativeKernels:
    """Mixin for quantizers with fused native kernels (``commhooks.native``).

    The class provides ``_native_ok(*tensors, numel=)`` (whether the kernels serve this config
    and these tensors), ``_native_compress(tensor, residual)`` (the payload, updating
    ``residual`` in place when given, or None with nothing written when ``c`` is not safely
    finite), ``_native_decodes(payload, ctx)`` (whether the kernel can decode this payload:
    sizes checked, since the kernel trusts them) and ``_native_decode(payload, ctx, out)``
    (decode, added into ``out`` when given). This mixin routes plain and error-feedback
    compression and the all-gather sum through them.
    """

    def _native_ok(self, *tensors: Tensor, numel: int | None = None) -> bool:
        raise NotImplementedError

    def _native_compress(self, tensor: Tensor, residual: Tensor | None) -> Any:
        raise NotImplementedError

    def _native_decodes(self, payload: Any, ctx: Any) -> bool:
        raise NotImplementedError

    def _native_decode(self, payload: Any, ctx: Any, out: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _compress_native(self, tensor: Tensor) -> Any:
        """The kernel's payload for ``tensor``, or None: take the torch path."""
        return self._native_compress(tensor, None) if self._native_ok(tensor) else None

    def _compress_feedback(
        self, tensor: Tensor, residual: Tensor, key: str | None
    ) -> tuple[Any, Any] | None:
        if not self._native_ok(tensor, residual):
            return None
        payload = self._native_compress(tensor, residual)
        return None if payload is None else (payload, None)

    def _decompress_native(self, payload: Any, ctx: Any) -> Tensor | None:
        return (
            self._native_decode(payload, ctx, None) if self._native_decodes(payload, ctx) else None
        )

    def aggregate(self, payloads: Sequence[Any], ctx: Any) -> Tensor:
        """The sum of decoded payloads; the kernel decodes the first into fresh memory (no
        zero fill) and adds each of the others straight into it."""
        if payloads and all(self._native_decodes(p, ctx) for p in payloads):
            acc = self._native_decode(payloads[0], ctx, None)
            for p in payloads[1:]:
                self._native_decode(p, ctx, acc)
            return acc.view(ctx.shape)
        return super().aggregate(payloads, ctx)  # type: ignore[misc]

    def _native_seed(self) -> int:
        """A 64-bit seed for the kernels' counter-based rounding noise, drawn from the
        compressor's private generator (so a resumed run draws the same)."""
        gen = self.generator(torch.device("cpu"))  # type: ignore[attr-defined]
        return int(torch.randint(0, 2**62, (1,), generator=gen))


def chunked(flat: Tensor, chunk: int) -> Tensor:
    """View a flat tensor as ``(ceil(n/chunk), chunk)``, zero-padding the last row.

    Zero padding can only widen the last chunk's range, never clip a real value.
    """
    n = flat.numel()
    pad = (-n) % chunk
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, chunk)


def unchunk(rows: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`chunked`: the first ``numel`` elements, flat."""
    return rows.reshape(-1)[:numel]
