"""What the sparsifiers share: the (values, index code) wire format and sampled thresholds."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from commhooks.coding.indices import decode_indices, encode_indices
from commhooks.compressors.base import (
    Compressor,
    CompressorConfig,
    Context,
    Payload,
    compute_dtype,
)

__all__ = [
    "Sparsifier",
    "keep_count",
    "sample_positions",
    "sampled_threshold",
    "select_at_least",
    "threshold_of",
]

C = TypeVar("C", bound=CompressorConfig)


def keep_count(ratio: float, n: int) -> int:
    """How many of ``n`` elements a ratio keeps: at least one, at most all."""
    return max(1, min(n, round(ratio * n)))


def sampled_threshold(
    magnitude: Tensor, fraction: float, sample: int, generator: torch.Generator
) -> Tensor:
    """Estimate the magnitude above which ``fraction`` of the elements lie, from a sample.

    The sample grows with 1/fraction so that at least ~64 sampled elements sit above the
    estimate, which keeps the count's relative error near 1/8 at any ratio.
    """
    where = sample_positions(magnitude.numel(), fraction, sample, generator, magnitude.device)
    return threshold_of(magnitude if where is None else magnitude[where], fraction)


def sample_positions(
    n: int, fraction: float, sample: int, generator: torch.Generator, device: torch.device
) -> Tensor | None:
    """Where :func:`sampled_threshold` samples (None: everywhere), drawn from ``generator``."""
    size = min(n, max(sample, math.ceil(64 / fraction)))
    if size >= n:
        return None
    return torch.randint(n, (size,), device=device, generator=generator)


def threshold_of(picked: Tensor, fraction: float) -> Tensor:
    """The sampled magnitudes' ``fraction`` quantile from the top (a 0-d tensor)."""
    rank = max(1, min(picked.numel(), round(fraction * picked.numel())))
    return picked.float().topk(rank, sorted=False).values.min()


def select_at_least(magnitude: Tensor, threshold: Tensor) -> Tensor:
    """Indices whose magnitude is not below ``threshold``.

    Written as ``~(m < t)`` so that NaN magnitudes are selected: a NaN gradient must reach the
    wire, and from there GradScaler, instead of being dropped as "small".
    """
    return (~(magnitude < threshold.to(magnitude.dtype))).nonzero().squeeze(1)


class Sparsifier(Compressor[C]):
    """Base of the index-coded sparsifiers: payload ``(values, index_code)``.

    Subclasses implement :meth:`_select`. Values travel in the input's dtype, in index order.
    """

    #: payload tensors after the values that describe where they go (pipelines need the count)
    index_arity: ClassVar[int] = 1

    @abstractmethod
    def _select(self, flat: Tensor, key: str | None) -> Tensor:
        """Indices of the elements to send (any order, unique)."""

    @property
    def _index_coding(self) -> str:
        return str(getattr(self.config, "index_coding", "auto"))

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        flat = tensor.reshape(-1)
        idx = self._select(flat, key).sort().values
        return self._payload(idx, flat[idx], flat.numel()), None

    def _payload(self, idx: Tensor, values: Tensor, n: int) -> Payload:
        """``(values, index code)`` for sorted positions ``idx`` of an ``n``-element tensor."""
        return values, encode_indices(idx, n, self._index_coding)

    def indices(self, index_payload: Payload, ctx: Context) -> Tensor:
        """Where the values of a payload go, decoded from the payload's index part."""
        return decode_indices(index_payload[0], ctx.numel)

    def scatter(self, values: Tensor, idx: Tensor, ctx: Context) -> Tensor:
        if values.numel() != idx.numel():
            raise ValueError(
                f"payload: {values.numel()} values for {idx.numel()} indices; corrupt payload"
            )
        out = torch.zeros(ctx.numel, dtype=values.dtype, device=values.device)
        out[idx] = values
        return out

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        return self.scatter(payload[0], self.indices(payload[1:], ctx), ctx)

    def subtract_sent_(self, target: Tensor, payload: Payload, ctx: Context) -> Tensor:
        """Only the sent elements change: ``c[i] - v[i]`` there (0 where the exact value was
        sent; not for unbiased random-k's rescaled values), ``c`` elsewhere; no dense decode."""
        if not payload:
            return target
        flat = target.view(-1)
        idx = self.indices(payload[1:], ctx)
        flat[idx] = flat[idx] - payload[0].to(flat.dtype)
        return target

    def aggregate(self, payloads: Any, ctx: Context) -> Tensor:
        """Sum of sparse payloads, accumulated in place rather than densified one by one."""
        acc = torch.zeros(ctx.numel, dtype=compute_dtype(ctx.dtype), device=ctx.device)
        for p in payloads:
            if p:
                acc.index_add_(0, self.indices(p[1:], ctx), p[0].to(acc.dtype))
        return acc.view(ctx.shape)
