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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_choice, check_int, check_real
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
    all_finite,
    check_group,
    check_tensor,
    compute_dtype,
    shared_generator,
)
from commhooks.registry import register

__all__ = [
    "FusedPowerSGDExchange", "PowerSGD", "PowerSGDConfig", "PowerSGDExchange", "as_matrix",
    "mq", "mtp", "orthogonalize",
]  # fmt: skip

Orthogonalization = Literal["auto", "gram_schmidt", "qr"]
ORTHOGONALIZATIONS: tuple[str, ...] = ("auto", "gram_schmidt", "qr")

# "auto" on accelerators uses Gram-Schmidt up to this rank and Householder QR above it, the
# switch torch's own PowerSGD hook makes: there Gram-Schmidt is r rounds of a few tiny batched
# kernels (rank 1 is a single normalization) while batched QR pays cuSOLVER's per-call launch and
# workspace costs, which only pay off as r grows, and Gram-Schmidt's cost and loss of
# orthogonality both grow with r. On CPU, LAPACK's QR measured as fast or faster at every rank
# (2 cores, batches of 1-64 matrices of 64-4096 rows: ~10-45 us at rank 1, 2-10x faster than
# Gram-Schmidt from rank 2), so "auto" is QR there.
GRAM_SCHMIDT_MAX_RANK = 2


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

    Tuning: start at rank 1-2 and raise it if accuracy lags; Vogels et al. (2019) match SGD
    with error feedback at rank 2 on ResNet-18/CIFAR-10 and rank 4 on an LSTM language
    model. Bytes grow linearly with rank. Keep ``warm_start`` on: one power-iteration step per
    training step is only a good approximation because it continues the previous one.
    PowerSGD is biased and discards most of each gradient, so always pair it with error
    feedback, and consider a few uncompressed warm-up steps (torch's ``start_powerSGD_iter``).
    Raising ``min_compression_rate`` sends more small matrices dense, which costs little.
    """

    name: ClassVar[str] = "powersgd"
    rank: int = 1
    warm_start: bool = True
    orthogonalization: Orthogonalization = "auto"
    min_compression_rate: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("rank", self.rank, lo=1)
        check_bool("warm_start", self.warm_start)
        check_choice("orthogonalization", self.orthogonalization, ORTHOGONALIZATIONS)
        check_real("min_compression_rate", self.min_compression_rate, 1.0)
        check_int("seed", self.seed)


def as_matrix(shape: torch.Size | Sequence[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` a tensor of ``shape`` is viewed as: ``shape[0]`` by the rest."""
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) == 0 or numel == 0:
        return (numel, 1) if numel else (0, 0)
    return shape[0], numel // shape[0]


def mtp(mats: Tensor | Sequence[Tensor], p: Tensor) -> Tensor:
    """``M^T P`` for a ``(batch, n, m)`` stack, as ``(P^T M)^T``: BLAS reads M row-major
    then, 5.5x faster on this CPU at 4096 x 4096, rank 4, than a bmm of the transposed view.
    A sequence of stacks stands for their sum ``M``, which is never formed."""
    srcs = [mats] if isinstance(mats, Tensor) else list(mats)
    pt = p.transpose(1, 2)
    out = torch.bmm(pt, srcs[0])
    for src in srcs[1:]:
        out.baddbmm_(pt, src)
    return out.transpose(1, 2)


def mq(mats: Sequence[Tensor], q: Tensor) -> Tensor:
    """``M Q`` for the sum ``M`` of ``(batch, n, m)`` stacks, one product per stack."""
    out = torch.bmm(mats[0], q)
    for src in mats[1:]:
        out.baddbmm_(src, q)
    return out


def orthogonalize(p: Tensor, method: str = "auto") -> Tensor:
    """Orthonormalize the columns of each matrix of a ``(batch, n, r)`` stack (a new tensor).

    A zero P (a zero gradient is legal) yields a zero approximation, never NaN, while NaN or
    Inf in a matrix spreads to its result, so a non-finite gradient stays visible.
    """
    if method == "auto":
        small = p.shape[-1] <= GRAM_SCHMIDT_MAX_RANK
        method = "gram_schmidt" if small and p.device.type != "cpu" else "qr"
    if method == "qr":
        # Householder QR: orthonormal columns even for a rank-deficient P, and a zero P gives
        # unit columns, whose Q = M^T P is then zero.
        return torch.linalg.qr(p, mode="reduced").Q
    return _gram_schmidt(p)


def _gram_schmidt(p: Tensor) -> Tensor:
    # Classical Gram-Schmidt, applied twice ("twice is enough"): one pass leaves a column that
    # is nearly in the span of the previous ones (P rank-deficient, e.g. M of rank < r) far from
    # orthogonal to them; the second pass restores orthogonality to rounding level.
    tiny = torch.finfo(p.dtype).tiny
    out = torch.empty_like(p)
    for k in range(p.shape[-1]):
        v = p[..., k : k + 1]
        if k:
            basis = out[..., :k]
            for _ in range(2):
                v = v - basis @ (basis.transpose(-2, -1) @ v)
        # clamp_min keeps an all-zero column zero and passes NaN through.
        norm = torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
        torch.div(v, norm, out=out[..., k : k + 1])
    return out


@register(PowerSGDConfig)
class PowerSGD(Compressor[PowerSGDConfig]):
    """PowerSGD compressor; see :class:`PowerSGDConfig`.

    ``compress`` is the single-worker (or all-gather) form: payload ``(P, Q)`` with P
    orthonormal, decoded as ``P Q^T``; uncompressed tensors send ``(values,)``. ``exchange``
    is the two-round all-reduce form, the one to use in training.
    """

    def __init__(self, config: PowerSGDConfig) -> None:
        super().__init__(config)
        # Per-key warm-start Q, (m, r) with unit columns, fp32 (fp64 for fp64 gradients).
        self._q: dict[str, Tensor] = {}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.LOWRANK,
            summable=True,
            static_size=True,
            unbiased=False,
            rounds=2,
            stateful=self.config.warm_start,
        )

    def compresses(self, n: int, m: int) -> bool:
        """Whether an ``n x m`` matrix is sent as P, Q (else dense)."""
        cfg = self.config
        return n > 0 and m > 0 and n * m >= cfg.min_compression_rate * (n + m) * cfg.rank

    # -- Q: warm start and shared initial draw -----------------------------------------------

    def _start_q(self, key: str | None, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The Q that ``key``'s next P = M Q uses: remembered, or a shared random draw."""
        r = self.config.rank
        step = 0
        if key is not None and self.config.warm_start:
            q = self._q.get(key)
            if q is not None and q.shape == (m, r):
                return q.to(device=device, dtype=dtype)
        elif key is not None:
            # Without warm start, a new subspace each step (as torch's hook draws); the per-key
            # counter agrees across ranks because every rank compresses each key once per step.
            step = self.next_step(key)
        gen = shared_generator(self.config.seed, key, step, device)
        return torch.randn((m, r), generator=gen, device=device, dtype=dtype)

    def _remember(self, keys: Sequence[str | None], q: Tensor, used: Tensor) -> None:
        """Store each key's new Q (``q[i]``, a ``(batch, m, r)`` stack) for the next step.

        Columns are normalized: only Q's direction matters, because P is orthonormalized, and
        unit columns keep P = M Q on the gradient's own scale however many ranks summed Q
        (torch's hook keeps the raw all-reduced Q, which grows with the world size). A Q that
        is non-finite (a NaN step, which GradScaler skips) or has a zero column (a zero
        gradient, from which power iteration could never recover) is not stored; the key keeps
        the Q it used. The check is a ``torch.where``, so no host sync.
        """
        if not self.config.warm_start or all(k is None for k in keys):
            return
        norm = torch.linalg.vector_norm(q, dim=-2, keepdim=True)
        ok = (torch.isfinite(norm) & (norm > 0)).all(dim=-1, keepdim=True)
        new = torch.where(ok, q / norm.clamp_min(torch.finfo(q.dtype).tiny), used)
        for i, k in enumerate(keys):
            if k is not None:
                self._q[k] = new[i]

    # -- single tensor ----------------------------------------------------------------------------

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        n, m = as_matrix(tensor.shape)
        if not self.compresses(n, m):
            return (tensor.reshape(-1),), None
        cd = compute_dtype(tensor.dtype)
        mat = _stack([tensor.reshape(n, m)], cd)
        q_used = self._start_q(key, m, cd, tensor.device).unsqueeze(0)
        p = orthogonalize(torch.bmm(mat, q_used), self.config.orthogonalization)
        q = mtp(mat, p)
        self._remember([key], q, q_used)
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
        return p @ q.T

    def aggregate(self, payloads: Sequence[Payload], ctx: Context) -> Tensor:
        """Sum of ``P_i Q_i^T`` as one product ``[P_1 .. P_k][Q_1 .. Q_k]^T``."""
        payloads = list(payloads)
        if ctx.numel == 0 or not payloads or any(len(p) != 2 for p in payloads):
            return super().aggregate(payloads, ctx)
        p = torch.cat([pl[0] for pl in payloads], dim=1)
        q = torch.cat([pl[1] for pl in payloads], dim=1)
        return (p @ q.T).reshape(ctx.shape).to(compute_dtype(ctx.dtype))

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
        state["q"] = dict(self._q)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._q = dict(state.get("q", {}))


def _stack(mats: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``(B, n, m)`` in ``dtype``: a view for a single matrix already in it (whose data starts
    on 16 bytes, on the CPU), else one copy.

    MKL's matrix-vector products (rank 1) round differently when the data starts elsewhere,
    and DDP puts a gradient wherever its bucket layout does, which changes when it rebuilds
    its buckets or resumes from a checkpoint: the copy keeps ``M Q`` independent of where
    the gradient lies. Measured here: 16-byte aligned views round as new memory does, at
    every offset, rank and shape tried; the others differ at rank 1.
    """
    m = mats[0]
    if len(mats) == 1 and (m.dtype != dtype or m.device.type != "cpu" or m.data_ptr() % 16 == 0):
        return m.unsqueeze(0).to(dtype)
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype, device=mats[0].device)
    for j, mat in enumerate(mats):
        out[j].copy_(mat)  # converts while copying: no half-precision intermediate stack
    return out


@dataclass
class _Batch:
    """Compressed matrices of one shape and compute dtype, multiplied together with bmm."""

    n: int
    m: int
    dtype: torch.dtype
    members: list[int]
    keys: list[str | None]
    mats: list[Tensor] | None  # (B, n, m) stacks summing to M; released once Q_local is known
    q_used: Tensor  # (B, m, r)
    p: Tensor  # (B, n, r): local M Q before round 1, the orthonormalized sum after
    q_local: Tensor | None = None  # (B, m, r): M^T P, this rank's round-2 contribution
    q_sum: Tensor | None = None  # (B, m, r): the all-reduced Q
    sizes: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        b, r = len(self.members), self.q_used.shape[-1]
        self.sizes = (b * self.n * r, b * self.m * r)


class PowerSGDExchange(Exchange):
    """PowerSGD's two all-reduce rounds over a group of tensors.

    Round 1 sums one buffer per compute dtype (fp32, plus fp64 if the group has fp64
    tensors) holding every compressed matrix's P and every dense tensor's values; round 2 sums
    one buffer of every Q. A group with no compressed matrix needs only round 1, and an empty
    group none; the decision depends only on shapes and config, so all ranks agree.
    Dense tensors are summed in fp32 whatever their dtype, which also keeps half-precision
    sums from overflowing mid-reduction.

    ``result()`` is ``P Q_sum^T`` (the sum over ranks of their approximations ``P Q_i^T``, as
    decompression is linear in Q) and ``local()`` is ``P Q_local^T``, this rank's own
    approximation, with P the orthonormalized sum every rank shares. After round 2 each key
    remembers Q_sum (see :meth:`PowerSGD._remember`), identically on every rank.

    The input tensors must stay unchanged until ``result()`` and ``local()`` have been read:
    a single matrix of a shape is used in place rather than copied, and dense tensors' own
    values are read back for ``local()``.
    """

    def __init__(
        self, compressor: PowerSGD, tensors: Sequence[Tensor], keys: Sequence[str | None]
    ) -> None:
        self._c = compressor
        self._tensors = list(tensors)
        self._batches: dict[tuple[torch.dtype, int, int], _Batch] = {}
        self._dense: list[int] = []
        devices = {t.device for t in tensors if t.numel()}
        if len(devices) > 1:
            raise ValueError(
                f"tensors: a group must live on one device, got {sorted(map(str, devices))}"
            )
        self._device = devices.pop() if devices else torch.device("cpu")

        groups: dict[tuple[torch.dtype, int, int], list[int]] = {}
        for i, t in enumerate(self._tensors):
            if t.numel() == 0:
                continue
            n, m = as_matrix(t.shape)
            if compressor.compresses(n, m):
                groups.setdefault((compute_dtype(t.dtype), n, m), []).append(i)
            else:
                self._dense.append(i)
        for (cd, n, m), members in groups.items():
            mats = self._sources(members, n, m, cd)
            q_used = torch.stack(
                [compressor._start_q(keys[i], m, cd, self._device) for i in members]
            )
            self._batches[(cd, n, m)] = _Batch(
                n, m, cd, members, [keys[i] for i in members], mats, q_used, mq(mats, q_used)
            )
        used = {compute_dtype(self._tensors[i].dtype) for i in self._dense}
        used.update(b.dtype for b in self._batches.values())
        # A fixed order (fp32 first) so every rank's message lines up.
        self._wire = [d for d in (torch.float32, torch.float64) if d in used]

        self._round = 0
        # Per round: the compute dtypes of its buffers, and the buffers.
        self._wires: list[list[torch.dtype]] = []
        self._messages: list[tuple[Tensor, ...]] = []
        if self._wire:
            self._wires.append(self._wire)
            self._messages.append(tuple(self._pack_round1(d) for d in self._wire))
        self._dense_sum: dict[int, Tensor] = {}
        self._result: list[Tensor] | None = None
        self._local: list[Tensor] | None = None

    # -- what this rank sends (the fused subclass adds the residuals) -----------------------------

    def _sources(self, members: list[int], n: int, m: int, dtype: torch.dtype) -> list[Tensor]:
        """``(B, n, m)`` stacks in ``dtype`` whose sum is the batch's matrices."""
        return [_stack([self._tensors[i].reshape(n, m) for i in members], dtype)]

    def _own_dense(self, i: int) -> Tensor:
        """Dense tensor ``i`` as this rank sends it (may share the input's memory)."""
        return self._tensors[i]

    # -- packing ----------------------------------------------------------------------------------

    def _batches_of(self, dtype: torch.dtype) -> list[_Batch]:
        return [b for b in self._batches.values() if b.dtype == dtype]

    def _dense_of(self, dtype: torch.dtype) -> list[int]:
        return [i for i in self._dense if compute_dtype(self._tensors[i].dtype) == dtype]

    def _pack_round1(self, dtype: torch.dtype) -> Tensor:
        parts = [b.p.reshape(-1) for b in self._batches_of(dtype)]
        parts += [self._own_dense(i).reshape(-1).to(dtype) for i in self._dense_of(dtype)]
        return torch.cat(parts)

    def _pack_round2(self, dtype: torch.dtype) -> Tensor:
        parts = []
        for b in self._batches_of(dtype):
            assert b.q_local is not None
            parts.append(b.q_local.reshape(-1))
        return torch.cat(parts)

    def _unpack(self, buf: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
        if buf.numel() != sum(sizes):
            raise ValueError(
                f"reduced: a buffer of {buf.numel()} elements where {sum(sizes)} were sent"
            )
        return torch.split(buf, sizes)

    def _receive_round1(self, dtype: torch.dtype, buf: Tensor) -> None:
        batches, dense = self._batches_of(dtype), self._dense_of(dtype)
        rank = self._c.config.rank
        sizes = [b.sizes[0] for b in batches] + [self._tensors[i].numel() for i in dense]
        pieces = self._unpack(buf, sizes)
        for b, piece in zip(batches, pieces):
            # Every rank orthonormalizes the same summed P, so all agree on P bit for bit.
            b.p = orthogonalize(piece.view(-1, b.n, rank), self._c.config.orthogonalization)
            assert b.mats is not None
            b.q_local = mtp(b.mats, b.p)
            b.mats = None
        for i, piece in zip(dense, pieces[len(batches) :]):
            # A copy: the reduced buffer belongs to the transport, which may reuse it.
            t = self._tensors[i]
            self._dense_sum[i] = piece.clone().view(t.shape)

    def _receive_round2(self, dtype: torch.dtype, buf: Tensor) -> None:
        batches = self._batches_of(dtype)
        rank = self._c.config.rank
        pieces = self._unpack(buf, [b.sizes[1] for b in batches])
        for b, piece in zip(batches, pieces):
            b.q_sum = piece.view(-1, b.m, rank).clone()
            self._c._remember(b.keys, b.q_sum, b.q_used)

    # -- the protocol -----------------------------------------------------------------------------

    def message(self) -> Message | None:
        if self._round >= len(self._messages):
            return None
        return Message(self._messages[self._round], ReduceOp.SUM)

    def receive(self, reduced: Sequence[Tensor]) -> None:
        if self._round >= len(self._messages):
            raise RuntimeError("exchange: receive() called after the last round")
        reduced = list(reduced)
        wire = self._wires[self._round]
        if len(reduced) != len(wire):
            raise ValueError(f"reduced: got {len(reduced)} tensors, sent {len(wire)}")
        for dtype, buf in zip(wire, reduced):
            if self._round == 0:
                self._receive_round1(dtype, buf)
            else:
                self._receive_round2(dtype, buf)
        self._round += 1
        if self._round == 1 and self._batches:
            wire2 = [d for d in self._wire if self._batches_of(d)]
            self._wires.append(wire2)
            self._messages.append(tuple(self._pack_round2(d) for d in wire2))

    def _require_done(self) -> None:
        if self._round < len(self._messages):
            raise RuntimeError("exchange: result() called before every round was received")

    def result(self) -> list[Tensor]:
        self._require_done()
        if self._result is None:
            self._result = self._assemble(lambda b: b.q_sum, self._dense_sum, summed=True)
        return list(self._result)

    def local(self) -> list[Tensor]:
        if self._messages and self._round < 1:
            raise RuntimeError("exchange: local() needs P, which round 1 produces")
        if self._local is None:
            own = {i: self._own_dense(i).clone() for i in self._dense}
            self._local = self._assemble(lambda b: b.q_local, own, summed=False)
        return list(self._local)

    def result_into(self, outs: Sequence[Tensor], divisor: float) -> None:
        """``P (Q_sum / divisor)^T`` multiplied straight into ``outs`` where an output is
        contiguous and in the compute dtype (no decoded copy), dense sums copied. Where
        ``outs`` are the inputs, read :meth:`local` first: it reads dense inputs again."""
        self._require_done()
        for b in self._batches.values():
            assert b.q_sum is not None
            q = b.q_sum.div(divisor).transpose(1, 2)
            for j, i in enumerate(b.members):
                o = outs[i]
                if o.dtype == b.dtype and o.is_contiguous():
                    torch.mm(b.p[j], q[j], out=o.view(b.n, b.m))
                else:
                    o.copy_((b.p[j] @ q[j]).view(o.shape))
        for i, v in self._dense_sum.items():
            outs[i].copy_(v.div(divisor).view(outs[i].shape))

    def _assemble(
        self, q_of: Callable[[_Batch], Tensor | None], dense: dict[int, Tensor], summed: bool
    ) -> list[Tensor]:
        """Per input: ``P q^T`` or the dense values; sums stay in the compute dtype."""

        def dtype_of(t: Tensor) -> torch.dtype:
            return compute_dtype(t.dtype) if summed else t.dtype

        out: list[Tensor | None] = [None] * len(self._tensors)
        for b in self._batches.values():
            q = q_of(b)
            assert q is not None
            approx = torch.bmm(b.p, q.transpose(1, 2))
            for j, i in enumerate(b.members):
                t = self._tensors[i]
                out[i] = approx[j].reshape(t.shape).to(dtype_of(t))
        for i, v in dense.items():
            out[i] = v.to(dtype_of(self._tensors[i]))
        return [
            o if o is not None else torch.empty(t.shape, dtype=dtype_of(t), device=t.device)
            for o, t in zip(out, self._tensors)
        ]


def _finite_rows(stack: Tensor) -> list[bool]:
    """Per matrix of a ``(B, ...)`` stack, whether every element is finite (one host sync)."""
    return torch.isfinite(stack).flatten(1).all(dim=1).tolist()


class FusedPowerSGDExchange(PowerSGDExchange):
    """PowerSGD's error-feedback exchange without a compensated copy of the gradients.

    The op-by-op path forms ``c = g + e`` in new memory, decodes ``P Q_sum^T`` and this rank's
    ``P Q_local^T`` into two more, and copies the mean into the bucket. Here ``M = g + e`` is
    never formed: ``M Q = g Q + e Q`` and ``M^T P = g^T P + e^T P`` (the same reads as forming
    ``c``, nothing written), the residual becomes ``decay * (g + e - P Q_local^T)`` in the
    residual's own memory (an add and an ``addmm_``) when the result is first read, and
    :meth:`result_into` multiplies ``P Q_sum^T`` straight into the caller's memory. Dense
    (small) tensors send ``g + e`` and keep a zero residual, as op by op.

    A matrix's residual is left as it was where this rank's ``P`` of it (round 1, which reads
    every element of ``g`` and ``e``) or its ``Q`` is not finite, a dense tensor's where its
    ``g + e`` is not, and all of them if the exchange is abandoned. Finite inputs whose new
    residual overflows fp32 (elements near 3.4e38) cannot be rolled back in place: that
    residual is reset to zero. The caller leaves ``g`` and ``e`` alone until the result is
    read.
    """

    def __init__(
        self,
        compressor: PowerSGD,
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        decay: float,
    ) -> None:
        self._residuals = list(residuals)
        self._decay = decay
        self._committed = False
        self._sent: dict[int, Tensor] = {}  # dense g + e, kept for local() after the commit
        super().__init__(compressor, tensors, keys)
        # Per matrix, this rank's P = M Q before round 1 (tiny) is non-finite wherever an
        # element of its g or e is (a product with NaN or Inf is never finite, even by 0); per
        # dense tensor, its g + e. Each commits or keeps its residual on its own, as op by op.
        self._finite = {k: _finite_rows(b.p) for k, b in self._batches.items()}
        self._finite_dense = {i: all_finite(v) for i, v in self._sent.items()}

    def _sources(self, members: list[int], n: int, m: int, dtype: torch.dtype) -> list[Tensor]:
        grads = [self._tensors[i].reshape(n, m) for i in members]
        residuals = [self._residuals[i].view(n, m) for i in members]
        return [_stack(grads, dtype), _stack(residuals, dtype)]

    def _own_dense(self, i: int) -> Tensor:
        if i not in self._sent:
            self._sent[i] = self._tensors[i] + self._residuals[i]
        return self._sent[i]

    def _commit(self) -> None:
        if self._committed:
            return
        self._committed = True
        for key, b in self._batches.items():
            assert b.q_local is not None
            ok = [p and q for p, q in zip(self._finite[key], _finite_rows(b.q_local))]
            for j, i in enumerate(b.members):
                if not ok[j]:
                    continue
                e = self._residuals[i].view(b.n, b.m)
                e.add_(self._tensors[i].reshape(b.n, b.m))
                e.addmm_(b.p[j], b.q_local[j].T, beta=self._decay, alpha=-self._decay)
                if not all_finite(e):
                    e.zero_()
        for i in self._dense:
            if self._finite_dense[i]:
                self._residuals[i].zero_()

    def result(self) -> list[Tensor]:
        out = super().result()
        self._commit()
        return out

    def result_into(self, outs: Sequence[Tensor], divisor: float) -> None:
        """The residuals first (they read the inputs, which ``outs`` may be), then the mean."""
        self._require_done()
        self._commit()
        super().result_into(outs, divisor)

    def abandon(self) -> None:
        self._committed = True
