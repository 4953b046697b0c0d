"""One training step of the engine: the object every front end opens, feeds and closes.

A step is a transaction over a :class:`~commhooks.engine.state.CompressionState`'s
per-rank state. It owns, for one step:

* the error-feedback journal and the compressor's state before the step (PowerSGD's Q, the
  shared generators' counters), so a step some rank overflowed on can be rolled back;
* the non-finite record: known on the host (the exchange read a flag) or as a device count
  (``nonfinite_check="device"``), applied when the step closes;
* the step's traffic, folded into the state's cumulative :class:`CommStats` on close;
* flattening: :meth:`Step.submit` packs a group of tensors into one buffer, hands it to the
  state's communication worker and gives back the means, split to the tensors' shapes.

Front ends are framework glue around it::

    step = state.begin()
    fut = step.submit(keys, tensors)      # on the communication worker, in submission order
    means = fut.wait()
    report = step.close()                 # commit or roll back; fold stats; count the step

The DDP hook feeds buckets through :func:`commhooks.engine.average.average_bucket`, which
opens the step on a step's first bucket and closes it on its last.

This module imports neither the state nor the averaging engine: :class:`EngineState` is the
state as a step and the engine use it (a structural type that
:class:`~commhooks.engine.state.CompressionState` satisfies), and the state hands each step
the averaging function (:data:`Average`) it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.futures import Future

from commhooks.comm.collectives import Collectives
from commhooks.comm.transport import Traffic, Transport, TransportStats
from commhooks.compressors.base import Compressor
from commhooks.engine.fallback import Fallback
from commhooks.engine.options import HookOptions
from commhooks.engine.worker import CommWorker
from commhooks.feedback import ErrorFeedback
from commhooks.stats import CommStats

__all__ = ["Average", "EngineState", "Step", "StepReport"]


class EngineState(Protocol):
    """What a step and the averaging engine use of their state
    (:class:`~commhooks.engine.state.CompressionState`); see there for each member."""

    options: HookOptions
    iteration: int
    compressor: Compressor[Any]
    feedback: ErrorFeedback | None
    fallback: Fallback | None
    worker: CommWorker
    open_step: Step | None
    # The cumulative stats a closing step folds its own into.
    _stats: CommStats

    @property
    def comm(self) -> Collectives: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def begin(self) -> Step: ...

    def key_of(self, param: Tensor) -> str: ...

    def pays(self, tensor: Tensor) -> bool: ...

    def check_agreement(self, bucket: Tensor) -> None: ...

    def memories(self) -> list[ErrorFeedback]: ...

    def checks_on_device(self, device: torch.device) -> bool: ...

    def count_nonfinite_on_device(self, skipped: Tensor) -> None: ...

    def step_closed(self) -> None: ...

    # Called by a step as it closes or aborts.
    def _closed(self, step: Step) -> None: ...


#: ``average(step, buffer, keys, shapes, final=..., memory=..., scatter=...)``: averages
#: ``buffer`` (the concatenated tensors named ``keys``) over ranks in place, within ``step``;
#: :func:`commhooks.engine.average.average_flat`
Average = Callable[..., None]


@dataclass
class StepReport(Traffic):
    """What one closed step moved (bytes, seconds), and whether it was skipped because some
    rank had non-finite values (known on the host; a device-mode count shows only in
    :meth:`CompressionState.stats`)."""

    nonfinite: bool = False


class Step:
    """One step's exchanges on ``state``; open it with :meth:`CompressionState.begin`.

    Args:
        state: the engine state whose error feedback, compressor and stats the step changes.
        average: what :meth:`submit` runs on the communication worker for each group
            (:func:`commhooks.engine.average.average_flat`).
    """

    def __init__(self, state: EngineState, average: Average) -> None:
        self.state = state
        self._average = average
        #: the traffic of the exchanges so far (``extra["nonfinite"]`` once some rank overflowed)
        self.traffic = TransportStats()
        #: DDP buckets held for the step's last one (``coalesce``): buffer, keys, shapes, future
        self.deferred: list[tuple[Tensor, list[str], list[torch.Size], Future[Tensor]]] = []
        self._snapshot: tuple[Compressor[Any], dict[str, Any]] | None = None
        self._bad: Tensor | None = None
        self._pending: list[Future[Any]] = []
        self.closed = False

    # -- the front end's side ---------------------------------------------------------------

    def submit(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        *,
        last: bool = False,
        memory: bool = True,
        scatter: bool = False,
    ) -> Future[list[Tensor]]:
        """Queue the mean over ranks of ``tensors`` on the communication worker.

        Args:
            keys: one name per tensor, naming its error-feedback memory; stable across steps
                and equal on every rank.
            tensors: the tensors (any shapes; one dtype is used on the wire, the first's
                promoted with the others'). They are copied now and left unchanged.
            last: no more submits follow in this step: the in-place error-feedback updates
                need no journal copy. Leave False when unsure (a later overflow then still
                rolls this group back).
            memory: False sends the tensors without this rank's error feedback, which stays
                as it was (an absent federated client).
            scatter: a reduce-scatter: only this rank's chunk of each mean comes back (the
                mean flattened and cut into ``world`` equal rows, row ``rank``). Over the
                reduce-scatter transport each destination is sent only its chunk, compressed
                once; the others average whole tensors. Every tensor's size must be a
                multiple of the world size.

        Returns:
            a future of the means, new tensors in the tensors' shapes and dtypes (with
            ``scatter``: flat chunks of ``numel // world`` elements).

        Raises:
            ValueError: keys and tensors differ in number; with ``scatter``, a tensor's size
                is not a multiple of the world size.
        """
        self._check_open()
        keys = list(keys)
        if len(keys) != len(tensors):
            raise ValueError(f"keys: {len(keys)} keys for {len(tensors)} tensors")
        if scatter:
            world = self.state.world_size
            for k, t in zip(keys, tensors):
                if t.numel() % world:
                    raise ValueError(
                        f"tensors: {k!r} has {t.numel()} elements, not a multiple of the "
                        f"{world} ranks a scatter cuts it for"
                    )
        shapes = [t.shape for t in tensors]
        dtypes = [t.dtype for t in tensors]
        device = tensors[0].device if tensors else torch.device("cpu")
        flat = (
            torch.cat([t.detach().reshape(-1) for t in tensors])
            if tensors
            else torch.empty(0, device=device)
        )

        def job() -> list[Tensor]:
            if tensors:
                self._average(self, flat, keys, shapes, final=last, memory=memory, scatter=scatter)
            pieces = flat.split([s.numel() for s in shapes])
            if scatter:
                world, rank = self.state.world_size, self.state.rank
                return [p.view(world, -1)[rank].to(d) for p, d in zip(pieces, dtypes)]
            return [p.view(s).to(d) for p, s, d in zip(pieces, shapes, dtypes)]

        fut = self.state.worker.submit(job, device)
        self._pending.append(fut)
        return fut

    def average(
        self, keys: Sequence[str], tensors: Sequence[Tensor], *, last: bool = False,
        memory: bool = True, scatter: bool = False,
    ) -> list[Tensor]:  # fmt: skip
        """:meth:`submit` and wait: the means over ranks of ``tensors`` (this rank's chunks
        with ``scatter``). If the exchange fails, the step is rolled back and the exception
        raised."""
        fut = self.submit(keys, tensors, last=last, memory=memory, scatter=scatter)
        try:
            return fut.wait()
        except Exception:
            self.state.worker.drain()
            self.abort()
            raise

    def mark_nonfinite(self) -> None:
        """Record that the step must be skipped: the front end found a non-finite average that
        the exchange's input check could not see (a sum that overflowed). Call it alike on
        every rank (the averages are the same everywhere); the step then rolls back on close."""
        self.traffic.extra["nonfinite"] = True

    @property
    def nonfinite(self) -> bool:
        """Whether some rank had non-finite values in an exchange of this step checked on the
        host (or :meth:`mark_nonfinite` was called)."""
        return bool(self.traffic.extra.get("nonfinite"))

    def close(self) -> StepReport:
        """Wait for the step's submits, then commit it: error-feedback changes kept, or rolled
        back where any rank had non-finite values; stats folded into the state; the step
        counted. A submit that failed aborts the step and its exception is raised here."""
        self._check_open()
        try:
            for fut in self._pending:
                fut.wait()
        except Exception:
            self.state.worker.drain()
            self.abort()
            raise
        # Every job of the step has run, so committing here, on the caller's thread, races
        # with nothing (the DDP hook closes from the worker itself).
        return self._commit()

    def abort(self) -> None:
        """Close the step without counting it: every memory change it made is rolled back and
        its stats dropped (a failed exchange, a backward that stopped early, a checkpoint
        loaded mid-step). A no-op on a closed step."""
        if self.closed:
            return
        if any(not f.done() for f in self._pending) and not self.state.worker.on_worker():
            # Its jobs still change the memories in place: let them finish first.
            self.state.worker.drain()
        self.closed = True
        stale, self.deferred = self.deferred, []
        for *_, fut in stale:
            fut.set_exception(RuntimeError("commhooks: backward ended before the last bucket"))
        for m in self.state.memories():
            m.rollback()
        if self._snapshot is not None:
            compressor, saved = self._snapshot
            compressor.load_state_dict(saved)
        self._snapshot = None
        self._bad = None
        self.state._closed(self)

    # -- the engine's side --------------------------------------------------------------------

    def record(self, traffic: TransportStats) -> None:
        """Add one exchange's transport stats to this step's."""
        self.traffic.add(traffic)
        self.traffic.extra.update(traffic.extra)

    def journal(self, in_place: bool, on_device: bool = False) -> None:
        """Before an exchange: whether more exchanges of this step follow it, so that fused
        in-place residual updates must be journaled (see ``ErrorFeedback.journal``). The
        first call also notes the compressor's state, which a rolled-back step restores."""
        if self._snapshot is None:
            current = self.state.transport.current
            self._snapshot = (current, current.state_dict())
        for m in self.state.memories():
            m.journal(in_place or on_device, on_device)

    def note_nonfinite(self, flag: Tensor) -> None:
        """Add an exchange's all-reduced count of overflowing ranks (a device tensor) to the
        step's; :meth:`close` undoes the step's memory changes where it is non-zero."""
        flag = flag.reshape(()).detach()
        self._bad = flag.clone() if self._bad is None else self._bad.add_(flag)

    # -- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("step: already closed; open a new one with state.begin()")

    def _commit(self) -> StepReport:
        state, st = self.state, self.traffic
        nonfinite, bad = self.nonfinite, self._bad
        for m in state.memories():
            if nonfinite:
                m.rollback()
            elif bad is not None:
                m.rollback_where(bad > 0)
            else:
                m.commit_step()
        if self._snapshot is not None:
            compressor, saved = self._snapshot
            if nonfinite:
                compressor.load_state_dict(saved)
            elif bad is not None:
                compressor.load_state_dict(_select(bad > 0, saved, compressor.state_dict()))
        self._snapshot = None
        if bad is not None and not nonfinite:
            state.count_nonfinite_on_device(bad > 0)
        self._bad = None
        s = state._stats
        s.steps += 1
        s.add(st)
        s.nonfinite_steps += int(nonfinite)
        s.last_raw_bytes, s.last_wire_bytes = st.raw_bytes, st.wire_bytes
        s.last_link_bytes = st.link_bytes
        s.last_compress_s, s.last_comm_s = st.compress_s, st.comm_s
        s.last_decompress_s = st.decompress_s
        self.closed = True
        state._closed(self)
        state.iteration += 1
        if state.feedback is not None and state.iteration > state.options.start_iter:
            state.feedback.step()
        state.step_closed()  # the log_every line and stats callbacks
        fields = {f.name: getattr(st, f.name) for f in dataclasses.fields(Traffic)}
        return StepReport(**fields, nonfinite=nonfinite)


def _select(bad: Tensor, old: Any, new: Any) -> Any:
    """``new`` with every tensor that has a same-shaped counterpart in ``old`` replaced by
    ``torch.where(bad, old, new)``; other values (counters) stay ``new``'s."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _select(bad, old[k], v) if k in old else v for k, v in new.items()}
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape == new.shape:
        return torch.where(bad.to(new.device), old, new)
    return new
