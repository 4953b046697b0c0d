"""Random-k sparsification with indices every rank draws alike, so payloads can be all-reduced."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_int, check_ratio
from commhooks.compressors._sparse import SparseFeedback, Sparsifier, keep_count, sent_exactly
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Exchange,
    Kind,
    Message,
    Payload,
    ReduceOp,
    poison,
    shared_generator,
)
from commhooks.feedback import (
    SAFE_SUM_ABS,
    FusedFeedbackExchange,
    register_fused,
    safely_finite,
    write_residual,
)
from commhooks.kernels import Backend, backend_for, backend_for_device
from commhooks.registry import register

__all__ = ["FusedRandomKExchange", "RandomK", "RandomKConfig"]


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
        # In float64, so finite fp16/fp32 values cannot overflow it into a false NaN.
        return (poison(values, flat.sum(dtype=torch.float64)),), idx

    def indices(self, index_payload: Payload, ctx: Context, count: int | None = None) -> Tensor:
        return ctx.extra


class _RandomKFeedback(SparseFeedback):
    """Random-k's fused error feedback: the all-reduce exchange below."""

    def exchange(
        self,
        codec: Compressor[Any],
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        world_size: int,
        decay: float,
    ) -> Exchange | None:
        """Error feedback around random-k without a dense compensated tensor or decode, where
        every tensor suits the native statistics pass (fp32, CPU, large) and the values go
        unscaled; see :class:`FusedRandomKExchange`."""
        assert isinstance(codec, RandomK)
        if codec.config.unbiased:
            return None
        ops = backend_for_device(tensors[0].device, "sparse-feedback")
        if ops is not None and all(ops.usable(t, e) for t, e in zip(tensors, residuals)):
            # On a device: finiteness stays a device flag, read by the residual kernel.
            flags = [ops.finite_flag(t.reshape(-1), e.view(-1)) for t, e in zip(tensors, residuals)]
            return FusedRandomKExchange(codec, tensors, residuals, keys, flags, decay, ops)
        kernels = [backend_for(t, e, op="stats") for t, e in zip(tensors, residuals)]
        if any(k is None for k in kernels):
            return None
        # One statistics pass per tensor, before any index is drawn. The torch path poisons
        # the values by a fp32 sum of c; with every |c| below SAFE_SUM_ABS that sum cannot
        # overflow, so its finiteness is c's, which the pass (summing in double) reports.
        # Larger finite values go op by op, where that sum decides.
        stats = [
            k.chunk_stats(t.reshape(-1), e.view(-1), t.numel())
            for k, t, e in zip(kernels, tensors, residuals)
            if k is not None
        ]
        finite = [math.isfinite(st.total) for st in stats]
        if any(
            f and not safely_finite(st.total, st.amax, SAFE_SUM_ABS) for f, st in zip(finite, stats)
        ):
            return None
        return FusedRandomKExchange(codec, tensors, residuals, keys, finite, decay)


register_fused(RandomK, _RandomKFeedback())


class FusedRandomKExchange(FusedFeedbackExchange):
    """Random-k's error-feedback exchange with the op-by-op path's numbers in fewer passes.

    Given each tensor's finiteness (from :meth:`_RandomKFeedback.exchange`'s statistics
    pass on the CPU; on a device, a device flag from the backend, so nothing is read back),
    construction gathers ``c = g + e`` at the shared indices (poisoned to NaN where
    some ``c`` is not finite, as the torch path does) and writes nothing. The residual, ``c``
    with the sent elements cleared (they go exactly), is written when :meth:`result` is first
    read, only where every ``c`` was finite; the result scatters the summed values into
    zeros. The caller leaves ``g`` and ``e`` alone until then.
    """

    def __init__(
        self,
        compressor: RandomK,
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        finite: Sequence[bool | Tensor],
        decay: float,
        ops: Backend | None = None,
    ) -> None:
        super().__init__(tensors, residuals, decay)
        self._finite = list(finite)
        self._ops = ops
        self._idx: list[Tensor] = []
        self._sent: list[Tensor] = []
        for g, e, k, ok in zip(self._grads, self._residuals, keys, self._finite):
            idx, _ = compressor._strata(g.numel(), k, g.device)
            self._idx.append(idx)
            self._sent.append(poison(g[idx] + e[idx], _probe(ok)))

    def message(self) -> Message | None:
        if self._reduced is not None or not self._grads:
            return None
        return Message(tuple(self._sent), ReduceOp.SUM)

    def receive(self, reduced: Sequence[Tensor]) -> None:
        self._reduced = list(reduced)

    def _commit(self) -> None:
        for g, e, idx, finite in zip(self._grads, self._residuals, self._idx, self._finite):
            if isinstance(finite, Tensor):
                assert self._ops is not None
                self._ops.compensate(g, e, finite, self._decay)
                e[idx] = torch.where(finite == 0, 0.0, e[idx])  # sent exactly, if committed
            elif finite:
                write_residual(e.add_(g), sent_exactly(idx), self._decay, keep="unchecked")

    def _scatter(self, values: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for v, idx, g, shape in zip(values, self._idx, self._grads, self._shapes):
            dense = torch.zeros(g.numel(), dtype=torch.float32, device=g.device)
            dense[idx] = v
            out.append(dense.view(shape))
        return out

    def result(self) -> list[Tensor]:
        return self._scatter(self._ready())

    def result_into(self, outs: Sequence[Tensor], divisor: float) -> None:
        """Zeros and the summed values / ``divisor`` straight into ``outs``, after the
        residuals (which read the inputs) are written."""
        for v, idx, o in zip(self._ready(), self._idx, outs):
            flat = o.view(-1)
            flat.zero_()
            flat[idx] = (v / divisor).to(flat.dtype)

    def local(self) -> list[Tensor]:
        return self._scatter(self._sent)


def _probe(finite: bool | Tensor) -> Tensor:
    """0 for finite, NaN otherwise (what :func:`poison` adds), for a host bool or a device
    flag (nonzero where not finite)."""
    if isinstance(finite, Tensor):
        return torch.where(finite.reshape(()) == 0, 0.0, math.nan)
    return torch.tensor(0.0 if finite else math.nan)
