"""Helpers shared by the quantizers: per-chunk views of a flat tensor."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunked", "unchunk"]


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
