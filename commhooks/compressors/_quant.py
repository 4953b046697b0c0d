"""Helpers shared by the quantizers: per-chunk views of a flat tensor."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["NativeKernels", "chunked", "unchunk"]


class NativeKernels:
    """Mixin for quantizers with fused native kernels (``commhooks.native``).

    The class provides ``_native_ok(*tensors, numel=)`` (whether the kernels serve this config
    and these tensors) and ``_native_compress(tensor, residual)`` (the payload, updating
    ``residual`` in place when given, or None with nothing written when ``c`` is not safely
    finite); this mixin routes plain and error-feedback compression through them.
    """

    def _native_ok(self, *tensors: Tensor, numel: int | None = None) -> bool:
        raise NotImplementedError

    def _native_compress(self, tensor: Tensor, residual: Tensor | None) -> Any:
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
