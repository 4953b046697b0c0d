"""Threshold sparsification: send every element whose magnitude reaches a fixed cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from commhooks._validate import check_choice, check_real
from commhooks.coding.indices import INDEX_CODINGS, IndexCoding
from commhooks.compressors._sparse import (
    Sparsifier,
    kernel_candidates,
    select_at_least,
    select_kernels,
)
from commhooks.compressors.base import Capabilities, CompressorConfig, Kind
from commhooks.registry import register

__all__ = ["Threshold", "ThresholdConfig"]


@dataclass(frozen=True)
class ThresholdConfig(CompressorConfig):
    """Fixed-magnitude threshold sparsification.

    Args:
        threshold: elements with ``|x| >= threshold`` are sent; must be > 0.
        index_coding: see :mod:`commhooks.coding.indices`; the default picks the smallest form
            for the density actually found.

    Tuning: the count, and so the bytes, follow the gradient's scale, which drifts during
    training and differs between layers. Prefer top-k or DGC unless a fixed cut is what you
    want (e.g. gradients normalised upstream). With error feedback, small elements accumulate
    until they cross the cut.
    """

    name: ClassVar[str] = "threshold"
    threshold: float = 1e-3
    index_coding: IndexCoding = "smallest"

    def __post_init__(self) -> None:
        check_real("threshold", self.threshold, 0.0, lo_open=True)
        check_choice("index_coding", self.index_coding, INDEX_CODINGS)


@register(ThresholdConfig)
class Threshold(Sparsifier[ThresholdConfig]):
    """Threshold sparsifier; see :class:`ThresholdConfig`."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kind=Kind.SPARSE, summable=False, static_size=False, unbiased=False)

    def _select(self, flat: Tensor, key: str | None) -> Tensor:
        cut = torch.tensor(self.config.threshold, device=flat.device)
        return select_at_least(flat.abs(), cut)

    def _native_pick(self, g: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor] | None:
        ops = select_kernels(g, e)
        if ops is None:
            return None
        # The fp32 cut, as the torch path compares fp32 magnitudes with it (rounded on the
        # host: no tensor, so nothing to read back).
        cut = float(np.float32(self.config.threshold))
        return kernel_candidates(ops, g, e, cut)
