"""Top-k sparsification: send the k largest-magnitude elements and where they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_choice, check_int, check_ratio
from commhooks.coding.indices import INDEX_CODINGS, IndexCoding, static_form
from commhooks.compressors._sparse import (
    Sparsifier,
    keep_count,
    kernel_candidates,
    sampled_threshold,
    sampled_threshold_of,
    select_at_least,
    select_kernels,
    trim_to,
)
from commhooks.compressors.base import Capabilities, CompressorConfig, Kind
from commhooks.feedback.residual import on_device
from commhooks.registry import register

__all__ = ["TopK", "TopKConfig"]

# The first estimate aims this much above k, so one pass usually yields enough candidates.
_OVERSHOOT = 1.3
# Candidates kept by the selection without host reads, in multiples of k: room for a
# threshold that admits more than it aimed at (the count's relative error is about 1/8).
_CAPACITY = 2


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
        if on_device():
            return _select_on_device(magnitude, k, self.generator(flat.device), self.config)
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

    def _index_form(self, n: int) -> tuple[int, int] | None:
        return static_form(keep_count(self.config.ratio, n), n, self.config.index_coding)

    # -- fused native selection: approximate mode, fp32 on the CPU ---------------------------

    def _native_pick(self, g: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """The same sampled threshold as :meth:`_select`, then one native pass; the exact
        top-k set whenever it finds at least k candidates (else the torch path decides)."""
        n = g.numel()
        k = keep_count(self.config.ratio, n)
        if on_device():  # the kernel's threshold and count are host values
            return None
        ops = None if self.config.mode == "exact" or k * 4 >= n else select_kernels(g, e)
        if ops is None:
            return None
        gen = self.generator(g.device)
        fraction = min(1.0, _OVERSHOOT * k / n)
        for _ in range(2):
            picked = kernel_candidates(
                ops, g, e, sampled_threshold_of(g, e, fraction, self.config.sample, gen)
            )
            if picked is None:
                return None
            if picked[0].numel() >= k:
                return trim_to(*picked, k)
            fraction = min(1.0, fraction * _OVERSHOOT * k / max(picked[0].numel(), 1))
        return None


def _select_on_device(
    magnitude: Tensor, k: int, gen: torch.Generator, config: TopKConfig
) -> Tensor:
    """``k`` distinct positions chosen with no host read (a step decided on the device): the
    elements at or above the sampled threshold, at most ``_CAPACITY * k`` of them in index
    order, trimmed to the ``k`` largest. That is the exact top-k set whenever the threshold
    admits between k and that many candidates, as it nearly always does. Otherwise it is
    still k positions sent with their exact values, which error feedback keeps correct: the
    largest of the first candidates, or, with too few, every candidate and the first
    positions below the threshold."""
    n = magnitude.numel()
    fraction = min(1.0, _OVERSHOOT * k / n)
    above = ~(magnitude < sampled_threshold(magnitude, fraction, config.sample, gen))
    cap = min(n, _CAPACITY * k)
    candidates = torch.nonzero_static(above, size=cap, fill_value=n).squeeze(1)
    # Filled slots (index n) rank below every real magnitude (>= 0, or NaN, which ranks first).
    padded = torch.cat([magnitude, magnitude.new_full((1,), -1.0)])
    picked = candidates[padded[candidates].topk(k, sorted=False).indices]
    spare = torch.nonzero_static(~above, size=k, fill_value=n).squeeze(1)
    missing = picked == n
    return torch.where(missing, spare[(missing.cumsum(0) - 1).clamp_(min=0)], picked)
