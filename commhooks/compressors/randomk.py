"""Random-k sparsification with indices every rank draws alike, so payloads can be all-reduced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_int, check_ratio
from commhooks.compressors._sparse import Sparsifier, keep_count
from commhooks.compressors.base import (
    Capabilities,
    CompressorConfig,
    Context,
    Kind,
    Payload,
    poison,
    shared_generator,
)
from commhooks.registry import register

__all__ = ["RandomK", "RandomKConfig"]


@dataclass(frozen=True)
class RandomKConfig(CompressorConfig):
    """Random-k sparsification with shared indices.

    Args:
        ratio: fraction of elements kept, in (0, 1].
        unbiased: scale kept values by the inverse of their inclusion probability (about
            1/ratio), making the estimate unbiased at the cost of variance. Leave off with error
            feedback, which corrects the bias itself.
        seed: the shared seed; it must be equal on every rank.

    Tuning: the indices come from ``(seed, key, call count)``, so no index bytes are sent and
    the values of all ranks line up: the payload is summable and all-reduce works. Each rank
    must compress a given key the same number of times. The draw is stratified (one index in
    each of k equal strata), so the count is exactly k and no two indices collide. Random-k
    converges more slowly than top-k at the same ratio; its appeal is the all-reduce.
    """

    name: ClassVar[str] = "randomk"
    ratio: float = 0.01
    unbiased: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_bool("unbiased", self.unbiased)
        check_int("seed", self.seed)


@register(RandomKConfig)
class RandomK(Sparsifier[RandomKConfig]):
    """Shared-seed random-k; see :class:`RandomKConfig`. Payload: the values only."""

    index_arity: ClassVar[int] = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.SPARSE,
            summable=True,
            static_size=True,
            unbiased=self.config.unbiased,
            stateful=True,
        )

    def _strata(self, n: int, key: str | None, device: torch.device) -> tuple[Tensor, Tensor]:
        k = keep_count(self.config.ratio, n)
        gen = shared_generator(self.config.seed, key, self.next_step(key), device)
        bounds = torch.div(torch.arange(k + 1, device=device) * n, k, rounding_mode="floor")
        sizes = bounds[1:] - bounds[:-1]
        offsets = (torch.rand(k, device=device, generator=gen) * sizes).long()
        return bounds[:-1] + torch.minimum(offsets, sizes - 1), sizes

    def _select(self, flat: Tensor, key: str | None) -> Tensor:
        return self._strata(flat.numel(), key, flat.device)[0]

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        flat = tensor.reshape(-1)
        idx, sizes = self._strata(flat.numel(), key, flat.device)
        values = flat[idx]
        if self.config.unbiased:
            values = values * sizes.to(values.dtype)
        # Elements left out are never read, so a NaN there would vanish; the sum sees them all.
        return (poison(values, flat.sum()),), idx

    def indices(self, index_payload: Payload, ctx: Context) -> Tensor:
        return ctx.extra
