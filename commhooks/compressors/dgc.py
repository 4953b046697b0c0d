"""Deep Gradient Compression's sampled top-k: a sampled threshold, trimmed only when far over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from commhooks._validate import check_choice, check_int, check_ratio, check_real
from commhooks.coding.indices import INDEX_CODINGS, IndexCoding
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
from commhooks.registry import register

__all__ = ["DGC", "DGCConfig"]


@dataclass(frozen=True)
class DGCConfig(CompressorConfig):
    """DGC selection (Lin et al., 2018).

    Args:
        ratio: target fraction of elements kept, in (0, 1].
        sample: minimum sample size for the threshold estimate.
        max_excess: when the sampled threshold admits more than ``max_excess * k`` elements,
            they are trimmed to k with an exact top-k over the candidates (DGC's hierarchical
            selection); below that the count is left as found. Must be >= 1.
        index_coding: see :mod:`commhooks.coding.indices`.
        seed: seed of the private sampling generator.

    Tuning: cheaper than ``topk`` because it never refines and rarely trims, at the price of a
    count that varies by ~10% around k. DGC's momentum correction, momentum-factor masking and
    warm-up sparsity are options of :class:`commhooks.ErrorFeedback`; use them with this
    compressor and a momentum-free optimizer.
    """

    name: ClassVar[str] = "dgc"
    ratio: float = 0.001
    sample: int = 8192
    max_excess: float = 1.3
    index_coding: IndexCoding = "smallest"
    seed: int = 0

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_int("sample", self.sample, lo=1)
        check_real("max_excess", self.max_excess, 1.0)
        check_choice("index_coding", self.index_coding, INDEX_CODINGS)
        check_int("seed", self.seed)


@register(DGCConfig)
class DGC(Sparsifier[DGCConfig]):
    """DGC sampled top-k; see :class:`DGCConfig`."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kind=Kind.SPARSE, summable=False, static_size=False, unbiased=False)

    def _select(self, flat: Tensor, key: str | None) -> Tensor:
        n = flat.numel()
        k = keep_count(self.config.ratio, n)
        magnitude = flat.abs()
        gen = self.generator(flat.device)
        threshold = sampled_threshold(magnitude, k / n, self.config.sample, gen)
        candidates = select_at_least(magnitude, threshold)
        if candidates.numel() > self.config.max_excess * k:
            candidates = candidates[magnitude[candidates].topk(k, sorted=False).indices]
        return candidates

    def _native_pick(self, g: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """:meth:`_select`'s sample, threshold and trim, with one native pass for the rest."""
        ops = select_kernels(g, e)
        if ops is None:
            return None
        n = g.numel()
        k = keep_count(self.config.ratio, n)
        gen = self.generator(g.device)
        cut = sampled_threshold_of(g, e, k / n, self.config.sample, gen)
        picked = kernel_candidates(ops, g, e, cut)
        if picked is not None and picked[0].numel() > self.config.max_excess * k:
            return trim_to(*picked, k)
        return picked
