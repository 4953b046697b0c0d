"""PowerSGD: rank-r approximation by one step of subspace iteration, warm-started across steps.

A tensor is viewed as an ``n x m`` matrix ``M`` (``shape[0]`` rows, the rest flattened). With a
shared ``m x r`` matrix ``Q`` (the previous step's, or a shared-seed random one)::

    P = M Q              # n x r, summed across ranks (round 1)
    P = orthogonalize(P)
    Q = M^T P            # m x r, summed across ranks (round 2)
    M ~ P Q^T            # decompression is linear in Q: the sum of Q decodes to the sum of M

Both rounds are all-reduces of one packed buffer: matrices of the same shape are stacked and
multiplied with ``torch.bmm``, and tensors too small to be worth compressing (biases, tiny
matrices) ride along densely in round 1 (Vogels et al., 2019; epfml/powersgd).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_choice, check_int, check_real
from commhooks.compressors._powersgd_exchange import FusedPowerSGDExchange, PowerSGDExchange
from commhooks.compressors._powersgd_memory import WarmStartMemory, unit_columns
from commhooks.compressors._powersgd_ops import (
    as_matrix,
    mq,
    mtp,
    orthogonalize,
    stack_matrices,
)
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Exchange,
    Kind,
    Payload,
    check_group,
    check_tensor,
    compute_dtype,
)
from commhooks.feedback.fused import FusedPath, register_fused
from commhooks.registry import register

__all__ = [
    "FusedPowerSGDExchange", "PowerSGD", "PowerSGDConfig", "PowerSGDExchange", "WarmStartMemory",
    "as_matrix", "mq", "mtp", "orthogonalize",
]  # fmt: skip

Orthogonalization = Literal["auto", "gram_schmidt", "qr"]
ORTHOGONALIZATIONS: tuple[str, ...] = ("auto", "gram_schmidt", "qr")
Precision = Literal["full", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {
    "full": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}  # fmt: skip
#: the most power iterations per step (``PowerSGDConfig.iterations``)
MAX_ITERATIONS = 10


@dataclass(frozen=True)
class PowerSGDConfig(CompressorConfig):
    """PowerSGD low-rank compression.

    Args:
        rank: r, the rank of the approximation (>= 1). Each compressed ``n x m`` matrix sends
            ``(n + m) * r`` fp32 values (fp64 for fp64 gradients).
        warm_start: reuse each key's last (all-reduced) Q as the next step's starting point, so
            successive steps continue a power iteration instead of restarting it. Costs
            ``m * r`` values of memory per key; needs stable keys.
        orthogonalization: how P is orthonormalized: ``"gram_schmidt"`` (classical, applied
            twice for stability), ``"qr"`` (Householder, ``torch.linalg.qr``) or ``"auto"``
            (on GPUs Gram-Schmidt for rank <= 2 and QR above, as torch's hook does; on CPU
            always QR, which LAPACK makes the faster one there).
        min_compression_rate: a matrix is compressed only when ``n * m >= min_compression_rate
            * (n + m) * rank`` (>= 1); smaller ones, and every 1-D tensor, travel dense.
        seed: seed of the shared generator that draws the initial Q. Every rank must use the
            same seed; the draw depends only on (seed, key), not on call order.
        iterations: power iterations per step (1 to 10): each is one P round and one Q round, so
            ``2 * iterations`` all-reduces. More than one refines the rank-r subspace within
            the step (warm start already continues it across steps).
        precision: the dtype P and Q travel in: ``"full"`` (the compute dtype: fp32, fp64 for
            fp64 gradients), ``"bf16"`` or ``"fp16"``, half the bytes. Each rank rounds its
            own Q before sending it, and error feedback keeps what the rounding lost; every
            rank orthonormalizes and decodes the same summed values in the compute dtype.
            An fp16 round whose sum comes back non-finite (a P or Q beyond 65504, as large
            gradients give) is sent again in the compute dtype, on every rank alike, and
            counted in the compressor's ``widened_rounds``; this costs one flag read on the
            host per fp16 round.

    Tuning: start at rank 1-2 and raise it if accuracy lags; Vogels et al. (2019) match SGD
    with error feedback at rank 2 on ResNet-18/CIFAR-10 and rank 4 on an LSTM language
    model. Bytes grow linearly with rank. Keep ``warm_start`` on: one power-iteration step per
    training step is only a good approximation because it continues the previous one.
    PowerSGD is biased and discards most of each gradient, so always pair it with error
    feedback, and consider a few uncompressed warm-up steps (torch's ``start_powerSGD_iter``).
    Raising ``min_compression_rate`` sends more small matrices dense, which costs little.
    ``precision="bf16"`` halves the bytes of a rank for the cost of 8-bit mantissas in P and
    Q: at the bytes of ``rank=r`` in fp32 it affords ``rank=2r``, or ``iterations=2`` at rank
    r. Prefer bf16 to fp16, whose range loses the small entries of Q (gradients times P). With
    AdamW on a small transformer (``docs/convergence.md``), at rank 4's fp32 bytes, rank 4 in
    bf16 with two iterations cut the gap to dense from +2.1% to +1.5%, and rank 8 in bf16 to
    +1.1%; bf16 alone cost nothing measurable. More iterations add all-reduce rounds: weigh
    them against a higher rank where latency, not bandwidth, limits the step.
    """

    name: ClassVar[str] = "powersgd"
    rank: int = 1
    warm_start: bool = True
    orthogonalization: Orthogonalization = "auto"
    min_compression_rate: float = 2.0
    seed: int = 0
    precision: Precision = "full"
    iterations: int = 1

    def __post_init__(self) -> None:
        check_int("rank", self.rank, lo=1)
        check_choice("precision", self.precision, tuple(PRECISIONS))
        check_int("iterations", self.iterations, lo=1)
        if self.iterations > MAX_ITERATIONS:
            raise ValueError(
                f"iterations={self.iterations}: must be <= {MAX_ITERATIONS}; each adds two "
                "all-reduce rounds and two matrix products per step, and warm start already "
                "continues the power iteration across steps, so a few refine the subspace as "
                "much as it can be refined; raise rank instead"
            )
        check_bool("warm_start", self.warm_start)
        check_choice("orthogonalization", self.orthogonalization, ORTHOGONALIZATIONS)
        check_real("min_compression_rate", self.min_compression_rate, 1.0)
        check_int("seed", self.seed)


@register(PowerSGDConfig)
class PowerSGD(Compressor[PowerSGDConfig]):
    """PowerSGD compressor; see :class:`PowerSGDConfig`.

    ``compress`` is the single-worker (or all-gather) form: payload ``(P, Q)`` with P
    orthonormal, decoded as ``P Q^T``; uncompressed tensors send ``(values,)``. ``exchange``
    is the two-round all-reduce form, the one to use in training.
    """

    uses_native_kernels: ClassVar[bool] = False

    def __init__(self, config: PowerSGDConfig) -> None:
        super().__init__(config)
        #: each key's warm-start Q (a read-only mapping), read and written by the exchanges
        self.memory = WarmStartMemory(
            config.rank, config.warm_start, config.seed, next_step=self.next_step
        )
        #: ``precision="fp16"`` rounds resent in the compute dtype because a P or Q (or its
        #: sum over ranks) passed fp16's largest value, 65504
        self.widened_rounds = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.LOWRANK,
            summable=True,
            static_size=True,
            unbiased=False,
            rounds=2 * self.config.iterations,
            stateful=self.config.warm_start,
        )

    @property
    def wire_dtype(self) -> torch.dtype | None:
        """The dtype P and Q travel in, or None for the compute dtype."""
        return PRECISIONS[self.config.precision]

    def compresses(self, n: int, m: int) -> bool:
        """Whether an ``n x m`` matrix is sent as P, Q (else dense)."""
        cfg = self.config
        return n > 0 and m > 0 and n * m >= cfg.min_compression_rate * (n + m) * cfg.rank

    # -- single tensor ----------------------------------------------------------------------------

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        n, m = as_matrix(tensor.shape)
        if not self.compresses(n, m):
            return (tensor.reshape(-1),), None
        cd = compute_dtype(tensor.dtype)
        mat = stack_matrices([tensor.reshape(n, m)], cd)
        q_used = self.memory.start(key, m, cd, tensor.device).unsqueeze(0)
        q = q_used
        for i in range(self.config.iterations):
            start = q_used if i == 0 else unit_columns(q, q_used)
            p = orthogonalize(torch.bmm(mat, start), self.config.orthogonalization)
            q = mtp(mat, p)
        wire = self.wire_dtype
        if wire is torch.float16:
            # Q = M^T P carries the gradient's scale and can pass fp16's 65504, while P is
            # orthonormal (|P| <= 1): a power of two moved from Q to P keeps P Q^T as it was
            # and both in range, for |Q| up to 2**30 (no host read: the shift is a tensor).
            shift = torch.log2(q.abs().amax() / 2**15).ceil().nan_to_num(0.0).clamp(0, 15)
            scale = torch.exp2(shift)
            p, q = p * scale, q / scale
        if wire is not None:
            p, q = p.to(wire), q.to(wire)
        self.memory.remember([key], q.to(cd), q_used)
        return (p[0], q[0]), None

    def subtract_sent_(self, target: Tensor, payload: Payload, ctx: Context) -> Tensor:
        """``target -= P Q^T`` as one in-place ``addmm_``: no dense decode in new memory."""
        if len(payload) != 2 or not target.is_contiguous():
            return super().subtract_sent_(target, payload, ctx)
        p, q = payload
        mat = target.view(p.shape[0], q.shape[0])
        mat.addmm_(p.to(mat.dtype), q.to(mat.dtype).T, alpha=-1)
        return target

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        if len(payload) == 1:
            return payload[0]
        p, q = payload
        if p.shape[0] * q.shape[0] != ctx.numel or p.shape[1] != q.shape[1]:
            raise ValueError(
                f"payload: P {tuple(p.shape)} and Q {tuple(q.shape)} do not decode to "
                f"{ctx.numel} elements; corrupt payload"
            )
        cd = compute_dtype(ctx.dtype)
        return p.to(cd) @ q.to(cd).T

    def aggregate(
        self, payloads: Sequence[Payload], ctx: Context, out: Tensor | None = None
    ) -> Tensor:
        """Sum of ``P_i Q_i^T`` as one product ``[P_1 .. P_k][Q_1 .. Q_k]^T`` (new memory)."""
        payloads = list(payloads)
        if ctx.numel == 0 or not payloads or any(len(p) != 2 for p in payloads):
            return super().aggregate(payloads, ctx, out)
        cd = compute_dtype(ctx.dtype)
        p = torch.cat([pl[0] for pl in payloads], dim=1).to(cd)
        q = torch.cat([pl[1] for pl in payloads], dim=1).to(cd)
        return (p @ q.T).reshape(ctx.shape)

    # -- all-reduce ---------------------------------------------------------------------------

    def exchange(
        self,
        tensors: Sequence[Tensor],
        keys: Sequence[str | None] | None = None,
        world_size: int = 1,
    ) -> Exchange:
        """Two-round all-reduce exchange of a group of tensors; see :class:`PowerSGDExchange`."""
        keys = check_group(tensors, keys, world_size)
        for t in tensors:
            check_tensor(t)
        return PowerSGDExchange(self, tensors, keys)

    def _exchange_feedback(
        self,
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        world_size: int,
        decay: float,
    ) -> Exchange | None:
        """Error feedback's exchange with no compensated copy, where every gradient is fp32
        or fp64, contiguous, and in its residual's dtype and device; see
        :class:`FusedPowerSGDExchange`. Other groups go op by op."""
        for t, e in zip(tensors, residuals):
            check_tensor(t)
            if not (
                t.dtype == e.dtype
                and t.dtype in (torch.float32, torch.float64)
                and t.device == e.device
                and t.is_contiguous()
                and e.is_contiguous()
            ):
                return None
        return FusedPowerSGDExchange(self, tensors, residuals, keys, decay)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``"q"``: each key's warm-start Q."""
        state = super().state_dict()
        state["q"] = self.memory.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state.get("q", {}))


class _PowerSGDFeedback(FusedPath):
    """PowerSGD's fused error feedback: :class:`FusedPowerSGDExchange`."""

    def exchange(
        self,
        codec: Compressor[Any],
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        world_size: int,
        decay: float,
    ) -> Exchange | None:
        assert isinstance(codec, PowerSGD)
        return codec._exchange_feedback(tensors, residuals, keys, world_size, decay)


register_fused(PowerSGD, _PowerSGDFeedback())
