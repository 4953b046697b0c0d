"""The error-feedback memory: per-key residuals (and DGC momenta) around any compressor, with
the step's journal, commit and rollback."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_int, check_ratio, check_real
from commhooks.compressors.base import (
    Compressor,
    CompressorConfig,
    Context,
    Exchange,
    Kind,
    Message,
    Payload,
    compute_dtype,
)
from commhooks.feedback.fused import fused_compress, fused_exchange, fused_path
from commhooks.feedback.residual import Keep, write_residual
from commhooks.registry import compressor as build_compressor

__all__ = ["ErrorFeedback", "FeedbackConfig"]


@dataclass(frozen=True)
class FeedbackConfig:
    """Error-feedback options.

    Args:
        decay: multiplies the residual each step, in (0, 1]. 1 is classic error feedback;
            slightly less (0.9-0.99) bounds stale residuals when gradients shift quickly.
        momentum: DGC momentum correction, in [0, 1). Momentum is accumulated here, before
            compression, instead of in the optimizer; use it with a sparsifier and an optimizer
            without momentum.
        momentum_masking: DGC momentum-factor masking: clear the momentum of elements just
            sent, so stale momentum does not push them again.
        warmup_steps: DGC warm-up sparsity: over this many steps the kept ratio falls
            exponentially from ``warmup_ratio`` to the compressor's own ratio. Needs a
            compressor whose config has a ``ratio``.
        warmup_ratio: the kept ratio at step 0 of the warm-up, in (0, 1].
    """

    decay: float = 1.0
    momentum: float = 0.0
    momentum_masking: bool = True
    warmup_steps: int = 0
    warmup_ratio: float = 0.25

    def __post_init__(self) -> None:
        check_real("decay", self.decay, 0.0, 1.0, lo_open=True)
        check_real("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_bool("momentum_masking", self.momentum_masking)
        check_int("warmup_steps", self.warmup_steps, lo=0)
        check_ratio("warmup_ratio", self.warmup_ratio)


class ErrorFeedback:
    """Per-key residual memory around any compressor.

    Args:
        compressor: a spec string, config or compressor.
        config: a :class:`FeedbackConfig`; keyword arguments build one when omitted.
        fused: take the compressors' fused kernels and exchanges where they have them (the
            default). ``False`` runs every step op by op: the reference the fused paths are
            tested against, bit for bit.

    ``compress(key, g)`` serves all-gather transports (send the payload, every rank decodes);
    ``exchange(keys, tensors, world_size)`` serves all-reduce transports of summable
    compressors. Call :meth:`step` once per optimizer step to advance the warm-up schedule.
    """

    def __init__(
        self,
        compressor: str | CompressorConfig | Compressor[Any],
        config: FeedbackConfig | None = None,
        *,
        fused: bool = True,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ValueError("options: pass either a FeedbackConfig or keyword options, not both")
        check_bool("fused", fused)
        self.fused = fused
        self.config = config if config is not None else FeedbackConfig(**options)
        self._base = build_compressor(compressor)
        kind = self._base.capabilities.kind
        if self.config.momentum > 0 and kind not in (Kind.SPARSE, Kind.PIPELINE):
            raise ValueError(
                f"momentum={self.config.momentum}: DGC momentum correction masks the elements "
                f"sent, which needs a sparsifier; {self._base.config.name!r} is a {kind.value}"
            )
        if self.config.warmup_steps and not hasattr(self._base.config, "ratio"):
            raise ValueError(
                f"warmup_steps={self.config.warmup_steps}: warm-up sparsity varies the kept "
                f"ratio, and {self._base.config.name!r} has no ratio field"
            )
        self._residuals: dict[str, Tensor] = {}
        self._momenta: dict[str, Tensor] = {}
        self._pending: dict[str, tuple[Tensor, Tensor | None, bool]] = {}
        # Per key, the residual and momentum before this step's first change to them.
        self._journal: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._journal_in_place = False
        self._on_device = False
        self._step = 0
        self._current = self._compressor_for(0)

    # -- the schedule ---------------------------------------------------------------------------

    @property
    def compressor(self) -> Compressor[Any]:
        """The compressor in use at the current step (warm-up swaps in denser ones)."""
        return self._current

    def ratio_at(self, step: int) -> float | None:
        """The kept ratio at ``step`` under the warm-up schedule (None without a ratio)."""
        final = getattr(self._base.config, "ratio", None)
        if final is None or step >= self.config.warmup_steps:
            return final
        start = max(self.config.warmup_ratio, final)
        return float(start * (final / start) ** (step / self.config.warmup_steps))

    def _compressor_for(self, step: int) -> Compressor[Any]:
        ratio = self.ratio_at(step)
        if ratio is None or ratio == getattr(self._base.config, "ratio", None):
            return self._base
        return build_compressor(dataclasses.replace(self._base.config, ratio=ratio))

    def step(self) -> None:
        """Advance one optimizer step."""
        self._step += 1
        if self._step <= self.config.warmup_steps:
            self._current = self._compressor_for(self._step)

    # -- the step as a transaction -------------------------------------------------------------

    def journal(self, in_place: bool, on_device: bool = False) -> None:
        """Whether the updates that follow, until the next call, must keep a copy of what they
        overwrite in place (fused kernels update residuals in place). Replaced residuals are
        always journaled, by reference. Copies cost a pass over the residuals, so the engine
        asks for them only for exchanges that other exchanges of the same step follow: the
        last one abandons itself on non-finite input, and once a step is known to be
        non-finite the engine sends the rest of it dense, without touching the memory.

        ``on_device``: the step is decided without host reads (:meth:`rollback_where`), so
        the updates store their residuals without checking them on the host; a non-finite
        one is undone with the rest of the step."""
        self._journal_in_place = in_place
        self._on_device = on_device

    def _touch(self, key: str, in_place: bool = False) -> None:
        """Journal ``key`` before its first change this step."""
        if key in self._journal:
            return
        e = self._residuals.get(key)
        if in_place and e is not None and self._journal_in_place:
            e = e.clone()
        self._journal[key] = (e, self._momenta.get(key))

    def commit_step(self) -> None:
        """Keep this step's changes."""
        self._journal.clear()

    def rollback(self) -> None:
        """Undo this step's changes: every residual and momentum is as the step found it."""
        for key, (e, m) in self._journal.items():
            for store, old in ((self._residuals, e), (self._momenta, m)):
                if old is None:
                    store.pop(key, None)
                elif store.get(key) is not old:
                    store[key] = old
        self._journal.clear()
        self._pending.clear()

    def rollback_where(self, bad: Tensor) -> None:
        """:meth:`rollback` where the 0-d bool tensor ``bad`` is true, else :meth:`commit_step`,
        decided on the device (no host read). A key the step created is zeroed rather than
        removed where ``bad``; zero memory and none send the same."""
        for key, (e, m) in self._journal.items():
            for store, old in ((self._residuals, e), (self._momenta, m)):
                new = store.get(key)
                if new is old:
                    continue
                if new is None:  # removed this step (``pop``): back where ``bad``, else zero
                    assert old is not None
                    store[key] = torch.where(bad.to(old.device), old, torch.zeros_like(old))
                    continue
                flag = bad.to(new.device)
                if old is None:
                    new.masked_fill_(flag, 0.0)
                else:
                    torch.where(flag, old, new, out=new)  # elementwise: in place is safe
        self._journal.clear()
        self._pending.clear()

    # -- compensation ---------------------------------------------------------------------------

    def residual(self, key: str) -> Tensor | None:
        """The residual stored for ``key`` (fp32, or fp64 for fp64 gradients), if any.

        Fused kernels update it in place: clone it to keep one step's value."""
        return self._residuals.get(key)

    def norm(self) -> float:
        """The l2 norm over every residual held (one read of the memory)."""
        total = sum(float(e.double().square().sum()) for e in self._residuals.values())
        return math.sqrt(total)

    def pop(self, key: str) -> Tensor | None:
        """Remove and return ``key``'s residual (and forget its momentum): for a caller that
        sends what is left uncompressed and stops compressing the tensor."""
        self._touch(key)
        self._momenta.pop(key, None)
        return self._residuals.pop(key, None)

    def _stored(self, key: str, tensor: Tensor) -> Tensor | None:
        e = self._residuals.get(key)
        if e is not None and e.shape != tensor.shape:
            raise RuntimeError(
                f"key {key!r}: residual has shape {tuple(e.shape)} but the tensor has "
                f"{tuple(tensor.shape)}; keys must name the same tensor every step"
            )
        return e

    def _compensate(self, key: str, tensor: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return ``u + e`` and, with momentum correction, the new momentum ``u``."""
        u = tensor.to(compute_dtype(tensor.dtype))
        momentum = None
        if self.config.momentum > 0:
            if _shares(u, tensor):
                u = u.clone()  # kept as momentum: must not be the caller's gradient memory
            old = self._momenta.get(key)
            momentum = u = u if old is None else old * self.config.momentum + u
        e = self._stored(key, tensor)
        return (u, momentum) if e is None else (u + e, momentum)

    def _keep(self) -> Keep:
        """A non-finite new residual is refused on the host, unless the step is decided on
        the device (then it is undone with the rest of the step)."""
        return "unchecked" if self._on_device else "host"

    def _update(
        self,
        key: str,
        compensated: Tensor,
        momentum: Tensor | None,
        sent: Tensor,
        in_place: bool = False,
    ) -> None:
        # In place only when ``compensated`` is this step's own memory (a refused residual
        # then leaves nothing that matters behind).
        sent = sent.to(compensated.dtype)
        residual = write_residual(
            compensated, sent, self.config.decay, keep=self._keep(), owned=in_place
        )
        if residual is None:
            return
        if momentum is not None:
            if self.config.momentum_masking:
                momentum = momentum.masked_fill(sent != 0, 0.0)
            self._touch(key)
            self._momenta[key] = momentum
        self._store(key, residual)

    def _store(self, key: str, residual: Tensor) -> None:
        self._touch(key)
        self._residuals[key] = residual

    def compress(self, key: str, tensor: Tensor) -> tuple[Payload, Context]:
        """Compensate ``tensor`` with ``key``'s residual, compress, and store the new residual.

        Three ways, fastest first: the fused path registered for the compressor and device
        (the residual is updated in place, see :func:`fused_compress`); else op by op, with
        the new residual computed in the compensated tensor's own memory (sparsifiers touch
        only what they sent); else, with momentum correction or a payload that is a view of
        the compensated tensor, the textbook ``c - decompress(payload)`` into new memory.
        """
        c = self._current
        e = self._stored(key, tensor)
        # A key's first step has no residual to update in place; it goes op by op.
        if self.fused and self.config.momentum == 0 and e is not None:
            path = fused_path(c, tensor.device)
            if path is not None and path.in_place(c):
                self._touch(key, in_place=True)
            fused = fused_compress(c, tensor, e, key)
            if fused is not None:
                # Updated in place, and finite: kernels refuse input that could overflow it
                # (unless the step is decided on the device, which undoes it where not).
                write_residual(e, None, self.config.decay, keep="unchecked")
                return fused
        compensated, momentum = self._compensate(key, tensor)
        payload, ctx = c.compress(compensated.to(tensor.dtype), key)
        if momentum is None and not any(_shares(t, compensated) for t in (tensor, *payload)):
            residual = write_residual(
                compensated,
                lambda target: c.subtract_sent_(target, payload, ctx),
                self.config.decay,
                keep=self._keep(),
            )
            if residual is not None:
                self._store(key, residual)
        else:
            self._update(key, compensated, momentum, c.decompress(payload, ctx))
        return payload, ctx

    def begin(self, key: str, tensor: Tensor) -> Tensor:
        """First half of a step for transports that compress in their own way: return
        ``u + e`` (fp32, or fp64), to be followed by :meth:`commit` with what was sent."""
        compensated, momentum = self._compensate(key, tensor)
        self._pending[key] = (compensated, momentum, not _shares(compensated, tensor))
        return compensated

    def commit(self, key: str, sent: Tensor, keep: Sequence[Tensor] = ()) -> None:
        """Second half: ``sent`` is this worker's decoded contribution for ``key``. The new
        residual is computed in the memory :meth:`begin` returned, unless that memory is the
        caller's gradient, the momentum, or shared with ``sent`` or a tensor in ``keep``."""
        pending = self._pending.pop(key, None)
        if pending is None:
            raise RuntimeError(f"key {key!r}: commit() without a matching begin()")
        compensated, momentum, fresh = pending
        sent = sent.reshape(compensated.shape)
        in_place = (
            fresh and momentum is None and not any(_shares(t, compensated) for t in (sent, *keep))
        )
        self._update(key, compensated, momentum, sent, in_place)

    def abort(self, key: str) -> None:
        """Drop a :meth:`begin` that will not be committed: the residual stays as it was."""
        self._pending.pop(key, None)

    def exchange(
        self, keys: Sequence[str], tensors: Sequence[Tensor], world_size: int = 1
    ) -> Exchange:
        """An all-reduce exchange of compensated tensors; residuals update when it finishes.
        Leave ``tensors`` unchanged until ``result()`` is read: a fused exchange
        (:func:`fused_exchange`) reads them again then."""
        if len(keys) != len(tensors):
            raise ValueError(f"keys: got {len(keys)} keys for {len(tensors)} tensors")
        # A fused exchange updates stored residuals in place, so every key needs one (a key's
        # first step goes op by op, as in compress()).
        if self.fused and self.config.momentum == 0 and tensors:
            stored = [self._stored(k, t) for k, t in zip(keys, tensors)]
            residuals = [e for e in stored if e is not None]
            if len(residuals) == len(stored):
                fused = fused_exchange(
                    self._current, tensors, residuals, keys, world_size, self.config.decay
                )
                if fused is not None:
                    # It updates the residuals in place only when its result is first read.
                    for k in keys:
                        self._touch(k, in_place=True)
                    fused.host_checks = not self._on_device
                    return fused
        return _FeedbackExchange(self, list(keys), list(tensors), world_size)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            # Copies: the fused kernels update residuals in place.
            "residuals": {k: v.clone() for k, v in self._residuals.items()},
            "momenta": {k: v.clone() for k, v in self._momenta.items()},
            "step": self._step,
            "compressor": self._base.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._journal.clear()
        self._residuals = {k: v.clone() for k, v in state["residuals"].items()}
        self._momenta = {k: v.clone() for k, v in state["momenta"].items()}
        self._step = int(state["step"])
        self._base.load_state_dict(state["compressor"])
        self._current = self._compressor_for(self._step)


def _shares(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors share memory (a payload may be a view of its input)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _FeedbackExchange(Exchange):
    """Wraps a compressor's exchange: compensate first, update residuals from ``local()``."""

    def __init__(
        self, ef: ErrorFeedback, keys: list[str], tensors: list[Tensor], world_size: int
    ) -> None:
        self._ef = ef
        self._keys = keys
        compensated = [ef.begin(k, t) for k, t in zip(keys, tensors)]
        self._inner = ef.compressor.exchange(
            [c.to(t.dtype) for c, t in zip(compensated, tensors)], keys, world_size
        )
        self._updated = False

    def message(self) -> Message | None:
        return self._inner.message()

    def receive(self, reduced: Sequence[Tensor]) -> None:
        self._inner.receive(reduced)

    def result(self) -> list[Tensor]:
        out = self._inner.result()
        if not self._updated:
            for k, sent in zip(self._keys, self._inner.local()):
                self._ef.commit(k, sent, keep=out)
            self._updated = True
        return out

    def local(self) -> list[Tensor]:
        return self._inner.local()

    def abandon(self) -> None:
        self._inner.abandon()
        for k in self._keys:
            self._ef.abort(k)
        self._updated = True
