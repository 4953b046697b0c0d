"""Top-k sparsification: send the k largest-magnitude elements and where they are."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from commhooks import native
from commhooks._validate import check_choice, check_int, check_ratio
from commhooks.coding.indices import INDEX_CODINGS, IndexCoding
from commhooks.compressors._sparse import (
    Sparsifier,
    keep_count,
    sample_positions,
    sampled_threshold,
    select_at_least,
    threshold_of,
)
from commhooks.compressors.base import Capabilities, CompressorConfig, Kind, Payload
from commhooks.registry import register

__all__ = ["TopK", "TopKConfig"]

# The first estimate aims this much above k, so one pass usually yields enough candidates.
_OVERSHOOT = 1.3


@dataclass(frozen=True)
class TopKConfig(CompressorConfig):
    """Top-k sparsification.

    Args:
        ratio: fraction of elements kept, in (0, 1]; k = round(ratio * numel), at least 1.
        mode: ``"approx"`` (default) estimates the k-th magnitude from a random sample, takes the
            elements above it (one refinement if too few), then trims the candidates to exactly k
            with a small top-k. Whenever at least k candidates are found, which is nearly always,
            the result is the exact top-k set; otherwise it falls back to ``"exact"``, a full
            ``torch.topk``.
        sample: minimum sample size for the threshold estimate (grown automatically at small
            ratios).
        index_coding: how indices travel, see :mod:`commhooks.coding.indices`. ``"auto"`` keeps
            payloads static in size; ``"delta"``/``"smallest"`` are smaller at low density but
            make sizes data-dependent.
        seed: seed of the private sampling generator.

    Tuning: ratios of 0.001-0.01 with error feedback keep accuracy on most models. Below
    ratio ~0.03 the indices cost more than the values; ``index_coding="delta"`` roughly halves
    them. Top-k is biased; always pair it with error feedback.
    """

    name: ClassVar[str] = "topk"
    ratio: float = 0.01
    mode: Literal["approx", "exact"] = "approx"
    sample: int = 8192
    index_coding: IndexCoding = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_choice("mode", self.mode, ("approx", "exact"))
        check_int("sample", self.sample, lo=1)
        check_choice("index_coding", self.index_coding, INDEX_CODINGS)
        check_int("seed", self.seed)


@register(TopKConfig)
class TopK(Sparsifier[TopKConfig]):
    """Top-k sparsifier; see :class:`TopKConfig`."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.SPARSE,
            summable=False,
            static_size=self.config.index_coding in ("auto", "fixed", "bitmap"),
            unbiased=False,
        )

    def _select(self, flat: Tensor, key: str | None) -> Tensor:
        n = flat.numel()
        k = keep_count(self.config.ratio, n)
        magnitude = flat.abs()
        if self.config.mode == "exact" or k * 4 >= n:
            return magnitude.topk(k, sorted=False).indices
        gen = self.generator(flat.device)
        fraction = min(1.0, _OVERSHOOT * k / n)
        candidates = select_at_least(
            magnitude, sampled_threshold(magnitude, fraction, self.config.sample, gen)
        )
        if candidates.numel() < k:
            # One refinement: aim lower in proportion to the shortfall.
            fraction = min(1.0, fraction * _OVERSHOOT * k / max(candidates.numel(), 1))
            candidates = select_at_least(
                magnitude, sampled_threshold(magnitude, fraction, self.config.sample, gen)
            )
            if candidates.numel() < k:
                return magnitude.topk(k, sorted=False).indices
        # Every element of the true top-k is at or above any threshold that admits >= k
        # candidates, so trimming the candidates gives the exact top-k set.
        return candidates[magnitude[candidates].topk(k, sorted=False).indices]

    # -- fused native selection: approximate mode, fp32 on the CPU ---------------------------

    def _native_top(self, g: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Positions (ascending) and values of the top-k of ``c = g + e``, found by the same
        sampled threshold as :meth:`_select` but in one pass over memory that allocates only
        the candidates; None, with nothing written, where the torch path must decide (exact
        mode, too few candidates twice, a non-finite ``c``, no kernels)."""
        n = g.numel()
        k = keep_count(self.config.ratio, n)
        tensors = (g,) if e is None else (g, e)
        if self.config.mode == "exact" or k * 4 >= n or not native.usable(*tensors):
            return None
        gen = self.generator(g.device)
        fraction = min(1.0, _OVERSHOOT * k / n)
        for _ in range(2):
            where = sample_positions(n, fraction, self.config.sample, gen, g.device)
            picked = g if where is None else g[where]
            if e is not None:
                picked = picked + (e if where is None else e[where])
            t = float(threshold_of(picked.abs(), fraction))
            if not math.isfinite(t):
                return None
            idx, val, finite = native.select_at_least(g, e, t)
            if not finite:
                return None
            if idx.numel() >= k:
                break
            fraction = min(1.0, fraction * _OVERSHOOT * k / max(idx.numel(), 1))
        else:
            return None
        if idx.numel() > k:
            # Trim to exactly k in place order: everything above the k-th magnitude, then the
            # first of its ties.
            mag = val.abs()
            kth = mag.topk(k, sorted=False).values.min()
            keep = mag > kth
            short = k - int(keep.sum())
            if short:
                tie = mag == kth
                keep |= tie & (tie.cumsum(0) <= short)
            idx, val = idx[keep], val[keep]
        return idx, val

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        top = self._native_top(tensor.reshape(-1), None)
        if top is None:
            return super()._compress(tensor, key)
        return self._payload(*top, tensor.numel()), None

    def _compress_feedback(
        self, tensor: Tensor, residual: Tensor, key: str | None
    ) -> tuple[Payload, Any] | None:
        g, e = tensor.reshape(-1), residual.view(-1)
        top = self._native_top(g, e)
        if top is None:
            return None
        idx, val = top
        # The new residual is c with the sent elements (sent exactly) cleared.
        e.add_(g).index_fill_(0, idx, 0.0)
        return self._payload(idx, val, g.numel()), None
