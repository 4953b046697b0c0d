"""PowerSGD's two-round all-reduce exchanges: the plain one and error feedback's fused one.

Built by :meth:`PowerSGD.exchange <commhooks.compressors.powersgd.PowerSGD.exchange>` and
``_exchange_feedback`` (its fused path); import them from
:mod:`commhooks.compressors.powersgd`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from commhooks.compressors._powersgd_memory import WarmStartMemory, unit_columns
from commhooks.compressors._powersgd_ops import as_matrix, mq, mtp, orthogonalize, stack_matrices
from commhooks.compressors.base import Exchange, Message, ReduceOp, compute_dtype
from commhooks.feedback.residual import write_residual

__all__ = ["FusedPowerSGDExchange", "LowRankCompressor", "PowerSGDExchange"]


class _LowRankSettings(Protocol):
    @property
    def rank(self) -> int: ...

    @property
    def iterations(self) -> int: ...

    @property
    def orthogonalization(self) -> str: ...


class LowRankCompressor(Protocol):
    """What an exchange uses of its compressor, :class:`~.powersgd.PowerSGD`: a structural
    type, so that this module need not import the compressor's."""

    #: ``precision="fp16"`` rounds resent in the compute dtype; the exchange counts them here
    widened_rounds: int

    @property
    def config(self) -> _LowRankSettings: ...

    @property
    def memory(self) -> WarmStartMemory: ...

    @property
    def wire_dtype(self) -> torch.dtype | None: ...

    def compresses(self, n: int, m: int) -> bool: ...


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
    remembers Q_sum (see :meth:`WarmStartMemory.remember`), identically on every rank.

    The input tensors must stay unchanged until ``result()`` and ``local()`` have been read:
    a single matrix of a shape is used in place rather than copied, and dense tensors' own
    values are read back for ``local()``.
    """

    def __init__(
        self, compressor: LowRankCompressor, tensors: Sequence[Tensor], keys: Sequence[str | None]
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
                [compressor.memory.start(keys[i], m, cd, self._device) for i in members]
            )
            self._batches[(cd, n, m)] = _Batch(
                n, m, cd, members, [keys[i] for i in members], mats, q_used, mq(mats, q_used)
            )
        used = {compute_dtype(self._tensors[i].dtype) for i in self._dense}
        used.update(b.dtype for b in self._batches.values())
        # A fixed order (fp32 first) so every rank's message lines up.
        self._wire = [d for d in (torch.float32, torch.float64) if d in used]

        self._round = 0
        self._iteration = 0  # power iterations whose Q round is done
        self._widened: set[int] = set()  # rounds resent in the compute dtype (overflow)
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
        return [stack_matrices([self._tensors[i].reshape(n, m) for i in members], dtype)]

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

    def _pack_p(self, dtype: torch.dtype) -> Tensor:
        """A later power iteration's P round: the batches' P = M Q, no dense tensors."""
        return torch.cat([b.p.reshape(-1) for b in self._batches_of(dtype)])

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
        """A P round: round 1 (with the dense tensors), or a later power iteration's."""
        batches = self._batches_of(dtype)
        dense = self._dense_of(dtype) if self._round == 0 else []
        last = self._iteration == self._c.config.iterations - 1
        rank = self._c.config.rank
        sizes = [b.sizes[0] for b in batches] + [self._tensors[i].numel() for i in dense]
        pieces = self._unpack(buf, sizes)
        for b, piece in zip(batches, pieces):
            # Every rank orthonormalizes the same summed P, so all agree on P bit for bit.
            b.p = orthogonalize(piece.view(-1, b.n, rank), self._c.config.orthogonalization)
            assert b.mats is not None
            b.q_local = mtp(b.mats, b.p)
            if last:
                b.mats = None
        for i, piece in zip(dense, pieces[len(batches) :]):
            # A copy: the reduced buffer belongs to the transport, which may reuse it.
            t = self._tensors[i]
            self._dense_sum[i] = piece.clone().view(t.shape)

    def _receive_round2(self, dtype: torch.dtype, buf: Tensor) -> None:
        batches = self._batches_of(dtype)
        rank = self._c.config.rank
        pieces = self._unpack(buf, [b.sizes[1] for b in batches])
        more = self._iteration < self._c.config.iterations - 1
        rounded = self._c.wire_dtype is not None and self._round not in self._widened
        for b, piece in zip(batches, pieces):
            if rounded:
                # What this rank sent was rounded: local() and error feedback see it so.
                assert b.q_local is not None
                b.q_local = b.q_local.to(self._c.wire_dtype).to(b.dtype)
            b.q_sum = piece.view(-1, b.m, rank).clone()
            if more:
                # Another power iteration within the step: P = M Q from the summed Q.
                assert b.mats is not None
                b.p = mq(b.mats, unit_columns(b.q_sum, b.q_used))
            else:
                self._c.memory.remember(b.keys, b.q_sum, b.q_used)

    # -- the protocol -----------------------------------------------------------------------------

    def _split(self, dtype: torch.dtype, numel: int) -> list[tuple[int, bool]]:
        """How this round's ``dtype`` buffer of ``numel`` elements travels: pieces of
        (elements, cast to the wire dtype). P and Q are cast under ``precision``; the dense
        tensors of round 1 keep the compute dtype, so they arrive summed exactly."""
        if self._c.wire_dtype is None or self._round in self._widened:
            return [(numel, False)]
        if self._round > 0:
            return [(numel, True)]
        p = sum(b.sizes[0] for b in self._batches_of(dtype))
        return [(k, cast) for k, cast in ((p, True), (numel - p, False)) if k]

    def message(self) -> Message | None:
        if self._round >= len(self._messages):
            return None
        wire = self._c.wire_dtype
        tensors: list[Tensor] = []
        for dtype, buf in zip(self._wires[self._round], self._messages[self._round]):
            plan = self._split(dtype, buf.numel())
            if len(plan) == 1 and not plan[0][1]:
                tensors.append(buf)
                continue
            for (_, cast), piece in zip(plan, buf.split([k for k, _ in plan])):
                tensors.append(piece.to(wire) if cast else piece)
        return Message(tuple(tensors), ReduceOp.SUM)

    def receive(self, reduced: Sequence[Tensor]) -> None:
        if self._round >= len(self._messages):
            raise RuntimeError("exchange: receive() called after the last round")
        reduced = list(reduced)
        wire = self._wires[self._round]
        plans = [self._split(d, b.numel()) for d, b in zip(wire, self._messages[self._round])]
        sent = sum(len(plan) for plan in plans)
        if len(reduced) != sent:
            raise ValueError(f"reduced: got {len(reduced)} tensors, sent {sent}")
        if self._overflowed(plans, reduced):
            # Every rank reads the same sums, so every rank resends this round alike.
            self._widened.add(self._round)
            self._c.widened_rounds += 1
            return
        for dtype, plan in zip(wire, plans):
            pieces, reduced = reduced[: len(plan)], reduced[len(plan) :]
            # Back from the wire dtype (precision="bf16", "fp16") to the compute dtype.
            buf = (
                pieces[0].to(dtype)
                if len(pieces) == 1
                else torch.cat([t.to(dtype) for t in pieces])
            )
            if self._round % 2 == 0:
                self._receive_round1(dtype, buf)
            else:
                self._receive_round2(dtype, buf)
        if self._round % 2 == 1:
            self._iteration += 1
        self._round += 1
        # Rounds alternate P and Q, ``iterations`` times each; the first P round carries the
        # dense tensors, so a group without compressed matrices needs only that one.
        if self._batches and self._round < 2 * self._c.config.iterations:
            wire2 = [d for d in self._wire if self._batches_of(d)]
            self._wires.append(wire2)
            pack = self._pack_round2 if self._round % 2 == 1 else self._pack_p
            self._messages.append(tuple(pack(d) for d in wire2))

    def _overflowed(self, plans: list[list[tuple[int, bool]]], reduced: list[Tensor]) -> bool:
        """Whether a round sent in fp16 came back with a non-finite sum: a rank's P or Q
        passed 65504 on the cast, or the sum did. The round is then resent in the compute
        dtype (one flag read on the host per fp16 round). A sum that stays non-finite there
        came from non-finite inputs, which the engine's own checks handle. bf16 has fp32's
        range and is not checked."""
        if self._c.wire_dtype is not torch.float16 or self._round in self._widened:
            return False
        cast = [t for t, (_, c) in zip(reduced, (p for plan in plans for p in plan)) if c]
        return bool(cast) and not all(bool(torch.isfinite(t).all()) for t in cast)

    def _require_done(self) -> None:
        if self._round < len(self._messages):
            raise RuntimeError("exchange: result() called before every round was received")

    def result(self) -> list[Tensor]:
        self._require_done()
        if self._result is None:
            self._result = self._assemble(lambda b: b.q_sum, self._dense_sum, summed=True)
        return list(self._result)

    def local(self) -> list[Tensor]:
        final_p = 2 * self._c.config.iterations - 1 if self._batches else 1
        if self._messages and self._round < final_p:
            raise RuntimeError("exchange: local() needs the last P round's P")
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

    These checks read device values on the host. With ``host_checks`` off (the engine's
    ``nonfinite_check="device"``, which undoes a whole step on the device where any rank
    overflowed) every residual is committed without them.
    """

    def __init__(
        self,
        compressor: LowRankCompressor,
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
        # Checked at the commit, if at all (``host_checks``).
        self._p_local = {k: b.p for k, b in self._batches.items()}

    def _sources(self, members: list[int], n: int, m: int, dtype: torch.dtype) -> list[Tensor]:
        grads = [self._tensors[i].reshape(n, m) for i in members]
        residuals = [self._residuals[i].view(n, m) for i in members]
        return [stack_matrices(grads, dtype), stack_matrices(residuals, dtype)]

    def _own_dense(self, i: int) -> Tensor:
        if i not in self._sent:
            self._sent[i] = self._tensors[i] + self._residuals[i]
        return self._sent[i]

    def _commit(self) -> None:
        if self._committed:
            return
        self._committed = True
        check = self.host_checks
        for key, b in self._batches.items():
            assert b.q_local is not None
            ok = (
                [p and q for p, q in zip(_finite_rows(self._p_local[key]), _finite_rows(b.q_local))]
                if check
                else [True] * len(b.members)
            )
            for j, i in enumerate(b.members):
                if not ok[j]:
                    continue
                e = self._residuals[i].view(b.n, b.m)
                p, q = b.p[j], b.q_local[j]
                sent = lambda c, p=p, q=q: c.addmm_(p, q.T, alpha=-1)  # noqa: E731
                c = e.add_(self._tensors[i].reshape(b.n, b.m))
                write_residual(c, sent, self._decay, keep="reset" if check else "unchecked")
        for i in self._dense:
            # Sent in full: the residual is c - c, zero where c is finite.
            c = self._sent[i]
            write_residual(c, c, keep="host" if check else "unchecked", into=self._residuals[i],
                           owned=False)  # fmt: skip

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
