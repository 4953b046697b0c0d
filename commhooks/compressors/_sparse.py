"""What the sparsifiers share: the (values, index code) wire format and sampled thresholds."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from commhooks.coding.indices import code_form, decode_indices, encode_indices
from commhooks.compressors.base import (
    Compressor,
    CompressorConfig,
    Context,
    Payload,
    sum_buffer,
)
from commhooks.feedback.fused import FusedPath, register_fused
from commhooks.feedback.residual import on_device, write_residual
from commhooks.kernels.backend import Backend
from commhooks.kernels.dispatch import backend_for

__all__ = [
    "SparseFeedback",
    "Sparsifier",
    "sent_exactly",
    "keep_count",
    "kernel_candidates",
    "select_kernels",
    "sample_positions",
    "sampled_threshold",
    "sampled_threshold_of",
    "select_at_least",
    "threshold_of",
    "trim_to",
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


def sampled_threshold_of(
    g: Tensor, e: Tensor | None, fraction: float, sample: int, generator: torch.Generator
) -> float:
    """:func:`sampled_threshold` of ``|g + e|`` without forming ``g + e``: only the sampled
    elements are added (the same draws, so the same threshold)."""
    where = sample_positions(g.numel(), fraction, sample, generator, g.device)
    picked = g if where is None else g[where]
    if e is not None:
        picked = picked + (e if where is None else e[where])
    return float(threshold_of(picked.abs(), fraction))


def select_kernels(g: Tensor, e: Tensor | None) -> Backend | None:
    """The kernel backend that selects from ``c = g + e`` in one pass, or None (torch path)."""
    return backend_for(*((g,) if e is None else (g, e)), op="select")


def kernel_candidates(
    ops: Backend, g: Tensor, e: Tensor | None, threshold: float
) -> tuple[Tensor, Tensor] | None:
    """Sorted positions and values of ``c = g + e`` with ``!(|c| < threshold)``, by the
    kernel (one pass, nothing written); None where ``c`` or the threshold is not finite, for
    the torch path to send it on."""
    if not math.isfinite(threshold):
        return None
    idx, val, finite = ops.select_at_least(g, e, threshold)
    return (idx, val) if finite else None


def trim_to(idx: Tensor, val: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest-magnitude of sorted candidates, still sorted: all above the k-th
    magnitude, then the first of its ties."""
    if idx.numel() <= k:
        return idx, val
    mag = val.abs()
    kth = mag.topk(k, sorted=False).values.min()
    keep = mag > kth
    short = k - int(keep.sum())
    if short:
        tie = mag == kth
        keep |= tie & (tie.cumsum(0) <= short)
    return idx[keep], val[keep]


def select_at_least(magnitude: Tensor, threshold: Tensor) -> Tensor:
    """Indices whose magnitude is not below ``threshold``.

    Written as ``~(m < t)`` so that NaN magnitudes are selected: a NaN gradient must reach the
    wire, and from there GradScaler, instead of being dropped as "small".
    """
    return (~(magnitude < threshold.to(magnitude.dtype))).nonzero().squeeze(1)


def sent_exactly(idx: Tensor) -> Callable[[Tensor], Tensor]:
    """What a sparsifier that sent the exact values of ``c`` at ``idx`` removes from ``c``
    (for :func:`~commhooks.feedback.write_residual`): it clears those elements."""
    return lambda c: c.index_fill_(0, idx, 0.0)


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

    def _native_pick(self, g: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Sorted positions and exact values of ``c = g + e`` to send, found by the native
        selection kernel without writing anything; None: take the torch path (:meth:`_select`).
        Only for sparsifiers that send the selected values unchanged."""
        return None

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        flat = tensor.reshape(-1)
        picked = self._native_pick(flat, None)
        if picked is not None:
            return self._payload(*picked, flat.numel()), None
        idx = self._select(flat, key).sort().values
        return self._payload(idx, flat[idx], flat.numel()), None

    def _payload(self, idx: Tensor, values: Tensor, n: int) -> Payload:
        """``(values, index code)`` for sorted positions ``idx`` of an ``n``-element tensor."""
        return values, encode_indices(idx, n, self._index_coding)

    def indices(self, index_payload: Payload, ctx: Context, count: int | None = None) -> Tensor:
        """Where the values of a payload go, decoded from the payload's index part.

        Args:
            index_payload: the payload's index part.
            ctx: the payload's context.
            count: how many values the payload holds (its values' length, known on the host
                from their shape), where the caller has them.
        """
        form = None
        # Inside a step decided on the device every payload comes from this config (one
        # transport, one compressor), so the form it fixes need not be read back: fixed by
        # the config and the size (top-k's k), or by the count of values sent and the
        # code's length (a threshold's).
        if on_device():
            form = self._index_form(ctx.numel)
            if form is None and count is not None:
                form = code_form(index_payload[0], count, ctx.numel, self._index_coding)
        return decode_indices(index_payload[0], ctx.numel, form)

    def _index_form(self, n: int) -> tuple[int, int] | None:
        """The index code's (tag, count) for an ``n``-element tensor where the config fixes
        both (see :func:`~commhooks.coding.indices.static_form`); None: read from the code,
        as for a payload of any config."""
        return None

    def scatter(self, values: Tensor, idx: Tensor, ctx: Context) -> Tensor:
        if values.numel() != idx.numel():
            raise ValueError(
                f"payload: {values.numel()} values for {idx.numel()} indices; corrupt payload"
            )
        out = torch.zeros(ctx.numel, dtype=values.dtype, device=values.device)
        out[idx] = values
        return out

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        return self.scatter(payload[0], self.indices(payload[1:], ctx, payload[0].numel()), ctx)

    def subtract_sent_(self, target: Tensor, payload: Payload, ctx: Context) -> Tensor:
        """Only the sent elements change: ``c[i] - v[i]`` there (0 where the exact value was
        sent; not for unbiased random-k's rescaled values), ``c`` elsewhere; no dense decode."""
        if not payload:
            return target
        flat = target.view(-1)
        idx = self.indices(payload[1:], ctx, payload[0].numel())
        flat[idx] = flat[idx] - payload[0].to(flat.dtype)
        return target

    def aggregate(self, payloads: Any, ctx: Context, out: Tensor | None = None) -> Tensor:
        """Sum of sparse payloads, accumulated in place (in ``out`` when given) rather than
        densified one by one."""
        acc = sum_buffer(ctx, out).view(-1)
        for p in payloads:
            if p:
                acc.index_add_(0, self.indices(p[1:], ctx, p[0].numel()), p[0].to(acc.dtype))
        return acc.view(ctx.shape)


class SparseFeedback(FusedPath):
    """The sparsifiers' fused error feedback: the selection kernel finds the values of
    ``c = g + e`` to send without writing anything, then the residual is ``c`` with them
    cleared, in ``e``'s memory."""

    def compress(
        self, codec: Compressor[Any], g: Tensor, e: Tensor, key: str | None
    ) -> tuple[Payload, Any] | None:
        assert isinstance(codec, Sparsifier)
        picked = codec._native_pick(g, e)
        if picked is None:
            return None
        idx, val = picked
        # Finite: the kernel reports a non-finite c, and the pick then refuses.
        write_residual(e.add_(g), sent_exactly(idx), keep="unchecked")
        return codec._payload(idx, val, g.numel()), None


register_fused(Sparsifier, SparseFeedback())
