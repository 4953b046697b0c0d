"""The averaging engine: a group of gradient tensors in, their average over ranks out.

Every front end reaches it through a :class:`~commhooks.engine.step.Step`:
:meth:`Step.submit` runs :func:`average_flat` on the communication worker (Horovod's
optimizer per bucket of parameters, update compression, federated rounds), and DDP's hook
runs :func:`average_bucket` there once per bucket (see :mod:`commhooks.engine.worker`). All
collectives go through ``state.comm`` (a :class:`~commhooks.comm.collectives.Collectives`),
warm-up included, in an order that depends only on the shapes and the config.

What one call does with a buffer (the concatenated gradients of some parameters):

* before ``start_iter`` steps, or for ``identity`` without error feedback (a compressor whose
  payload is the gradient itself): one dense all-reduce, in place;
* after: the small and 1-D tensors, plus a count of ranks holding non-finite values, in one
  dense all-reduce (riding in the transport's first round when it sums); the rest through the
  state's transport, with error feedback per parameter. A step on which some rank overflowed
  goes dense everywhere, so the optimizer and GradScaler see the inf/nan, and the step's
  error-feedback changes are rolled back when it closes (:meth:`Step.close`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

from commhooks.comm.transport import TransportStats, count_allreduce
from commhooks.engine.fallback import COMPRESSED
from commhooks.engine.step import EngineState, Step
from commhooks.engine.worker import HELD
from commhooks.feedback import all_finite, decided_on_device

__all__ = ["average_bucket", "average_flat", "goes_dense", "param_views"]


def param_views(buffer: Tensor, params: Sequence[Tensor] | Sequence[torch.Size]) -> list[Tensor]:
    """Per-tensor views of a flat buffer holding ``params`` (tensors or shapes) in order."""
    views, pos = [], 0
    for p in params:
        shape = p.shape if isinstance(p, Tensor) else p
        n = shape.numel()
        views.append(buffer[pos : pos + n].view(shape))
        pos += n
    return views


def goes_dense(state: EngineState, tensor: Tensor) -> bool:
    """Whether the engine sends ``tensor`` uncompressed, with the bucket's small ones: fewer
    than ``min_numel`` elements, 1-D (unless ``compress_1d``), or below ``min_ratio``."""
    opts = state.options
    return (
        tensor.numel() < opts.min_numel
        or (tensor.dim() <= 1 and not opts.compress_1d)
        or not state.pays(tensor)
    )


def average_bucket(
    state: EngineState,
    buffer: Tensor,
    params: list[Tensor],
    future: Future[Tensor],
    *,
    first: bool,
    last: bool,
) -> Any:
    """Average one DDP bucket in place and return it; runs on the communication worker.

    ``first`` opens a step (rolling back one still open: its backward stopped before the
    last bucket, or one of its jobs failed) and ``last`` closes it. With ``coalesce`` the
    buckets before the last are held (the return value is
    :data:`~commhooks.engine.worker.HELD`) and exchanged together with the last, which then
    completes their futures.
    """
    if buffer.is_complex():
        raise ValueError(
            f"bucket: {buffer.dtype} gradients; commhooks compresses real gradients only "
            "(register() names the parameter)"
        )
    step = state.begin() if first else state.open_step
    if step is None:
        # An earlier bucket of this backward failed and rolled the step back: the rest of it
        # must not open (and later commit) a step of its own.
        raise RuntimeError("commhooks: an earlier bucket of this step failed; step skipped")
    state.check_agreement(buffer)
    keys = [state.key_of(p) for p in params]
    shapes = [p.shape for p in params]
    held = False
    try:
        if state.iteration < state.options.start_iter:
            _dense_in_place(step, buffer)
        elif state.fallback is not None:
            _measured(step, buffer, keys, shapes, final=last)
        elif state.options.coalesce and not last:
            step.deferred.append((buffer, keys, shapes, future))
            held = True
        else:
            _average_deferred(step, buffer, keys, shapes, final=last)
    except Exception:
        step.abort()
        raise
    if last:
        step.close()
    return HELD if held else buffer


def average_flat(
    step: Step,
    buffer: Tensor,
    keys: list[str],
    shapes: Sequence[torch.Size],
    *,
    final: bool = True,
    memory: bool = True,
    scatter: bool = False,
) -> None:
    """Average ``buffer`` (the concatenated tensors named ``keys``, of ``shapes``) over ranks,
    in place and synchronously on the calling thread: dense before ``start_iter``,
    compressed after. :meth:`Step.submit` runs it on the communication worker.

    ``final=False`` says more buffers of this step follow: the in-place error-feedback
    updates are then journaled, so that a later buffer's overflow can roll the whole step
    back. ``memory=False`` sends the buffer without this rank's error feedback, which stays
    as it was (an absent federated client). ``scatter=True`` makes sure only of this rank's
    chunk of each tensor (its flat view cut into ``world`` rows, row ``rank``): the
    compressed ones go through :meth:`Transport.scatter`, so the rest of them is left stale.
    """
    state = step.state
    state.check_agreement(buffer)
    if state.iteration < state.options.start_iter:
        _dense_in_place(step, buffer)
    else:
        parts = [(buffer, keys, list(shapes))]
        _average_parts(step, parts, final=final, memory=memory, scatter=scatter)


def _average_deferred(
    step: Step, buffer: Tensor, keys: list[str], shapes: list[torch.Size], final: bool
) -> None:
    """Average the held buckets and this one in one go, then complete the held futures."""
    held, step.deferred = step.deferred, []
    parts = [*((b, k, s) for b, k, s, _ in held), (buffer, keys, shapes)]
    try:
        _average_parts(step, parts, final=final)
    except Exception as e:
        for *_, fut in held:
            fut.set_exception(e)
        raise
    for b, *_, fut in held:
        fut.set_result(b)


def _measured(
    step: Step, buffer: Tensor, keys: list[str], shapes: list[torch.Size], final: bool
) -> None:
    """``fallback="auto"``: probe both paths, then keep the faster (see ``engine/fallback.py``)."""
    state = step.state
    assert state.fallback is not None
    path, probe = state.fallback.plan(tuple(keys), state.comm, buffer.device)
    if probe:
        _sync(buffer)  # backward's queued kernels must not be charged to either path
    t0 = time.perf_counter()
    if path == COMPRESSED:
        _average_parts(step, [(buffer, keys, shapes)], final=final)
    else:
        # Settled dense: what error feedback still holds for these tensors goes now (popped
        # under the step's journal, so a skipped step gives it back).
        if not probe and state.feedback is not None and all_finite(buffer):
            for view, key in zip(param_views(buffer, shapes), keys):
                residual = state.feedback.pop(key)
                if residual is not None:
                    view.add_(residual.to(view.dtype))
        _dense_in_place(step, buffer)
        # The average is the same on every rank: non-finite exactly where some rank's input
        # was (or the sum overflowed, which the optimizer skips as well), so the step is.
        if not all_finite(buffer):
            step.mark_nonfinite()
    if probe:
        _sync(buffer)
        state.fallback.record(tuple(keys), path, time.perf_counter() - t0)


def _sync(buffer: Tensor) -> None:
    if buffer.is_cuda:
        torch.cuda.synchronize(buffer.device)


def _dense_in_place(step: Step, buffer: Tensor) -> None:
    """A plain all-reduce of the whole buffer, divided by the world size (warm-up, fallback)."""
    traffic = TransportStats(raw_bytes=buffer.numel() * buffer.element_size())
    _all_reduce_in_place(step.state, [buffer], traffic)
    step.record(traffic)


def _all_reduce_in_place(
    state: EngineState, buffers: list[Tensor], traffic: TransportStats
) -> None:
    """Replace each buffer by its average over ranks: one all-reduce each, no copies."""
    for buffer in buffers:
        t0 = time.perf_counter()
        state.comm.all_reduce(buffer)
        traffic.comm_s += time.perf_counter() - t0
        count_allreduce(traffic, buffer, state.world_size)
        buffer.div_(state.world_size)


def _nonfinite_on_device(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """1 (in ``dtype``, shape ``(1,)``, on the tensors' device) if any element of ``tensors``
    is inf or nan, else 0, without a host read. A float64 sum of fp32 or half values cannot
    overflow, so it is finite exactly when every element is: one pass. (fp64 values beyond
    1e308 would read as an overflow.)"""
    total = torch.stack([t.sum(dtype=torch.float64) for t in tensors]).sum()
    return (~torch.isfinite(total)).to(dtype).reshape(1)


def _passes_through(state: EngineState) -> bool:
    """Whether the exchange is the gradients themselves, summed (``identity`` without error
    feedback over the flat all-reduce transport): then packing the bucket's tensors into one
    buffer and copying the means back, as the transport does for a payload, only costs time."""
    return (
        state.feedback is None
        and state.compressor.capabilities.passthrough
        and state.transport.sums_in_place
    )


def _average_in_place(step: Step, buffers: list[Tensor], traffic: TransportStats) -> None:
    """:func:`_average_parts` for a pass-through exchange: every buffer all-reduced in place.
    Nothing is remembered, so an overflow needs no rollback; it is only counted (the average is
    non-finite exactly where some rank's input was, or the sum overflowed, alike everywhere)."""
    state = step.state
    _all_reduce_in_place(state, buffers, traffic)
    if state.checks_on_device(buffers[-1].device):
        step.note_nonfinite(_nonfinite_on_device(buffers, torch.float32))
    elif not all(all_finite(b) for b in buffers):
        traffic.extra["nonfinite"] = True
    step.record(traffic)


def _dense_average(
    state: EngineState,
    views: list[Tensor],
    idx: list[int],
    traffic: TransportStats,
    extra: Tensor | None = None,
) -> Tensor | None:
    """Average ``views[i]`` for ``i in idx`` in place with one all-reduce; ``extra`` rides
    along at the end and is returned summed over ranks."""
    tail = [extra] if extra is not None else []
    flat = torch.cat([*(views[i].reshape(-1) for i in idx), *tail])
    state.comm.all_reduce(flat)
    count_allreduce(traffic, flat, state.world_size)
    _write_mean(state, views, idx, flat[: flat.numel() - len(tail)])
    return flat[-1] if extra is not None else None


def _write_mean(state: EngineState, views: list[Tensor], idx: list[int], summed: Tensor) -> None:
    """Copy the sum over ranks of ``views[i]`` for ``i in idx`` (concatenated), divided by
    the world size, into them."""
    body = summed.div_(state.world_size)
    for i, piece in zip(idx, body.split([views[i].numel() for i in idx])):
        views[i].copy_(piece.view(views[i].shape))


def _average_parts(
    step: Step,
    parts: list[tuple[Tensor, list[str], list[torch.Size]]],
    *,
    final: bool,
    memory: bool = True,
    scatter: bool = False,
) -> None:
    """Average several buffers (DDP buckets) in place with one set of collectives;
    ``scatter``: only each compressed tensor's chunk of this rank (see :func:`average_flat`)."""
    state = step.state
    buffers = [b for b, _, _ in parts]
    traffic = TransportStats(raw_bytes=sum(b.numel() * b.element_size() for b in buffers))
    if _passes_through(state):
        _average_in_place(step, buffers, traffic)
        return
    names = [k for _, ks, _ in parts for k in ks]
    views = [v for b, _, shapes in parts for v in param_views(b, shapes)]
    dense, sparse = [], []
    for i, v in enumerate(views):
        (dense if goes_dense(state, v) else sparse).append(i)

    # The small tensors' all-reduce also carries a count of ranks holding non-finite values,
    # so every rank learns of an overflow before anything is committed: such a step goes
    # dense (the optimizer and GradScaler see the inf/nan) and error feedback is not touched.
    # Over an all-reduce transport they ride in its first round (one collective fewer); the
    # round's work is then dropped on every rank alike.
    if step.nonfinite:
        # An earlier exchange of this step overflowed on some rank, so the step will be
        # skipped: the rest goes dense, leaving error feedback alone.
        _dense_average(state, views, list(range(len(views))), traffic)
        traffic.extra["nonfinite"] = True
        step.record(traffic)
        return
    keys = [names[i] for i in sparse]
    if sparse and state.checks_on_device(buffers[-1].device):
        _average_on_device(step, views, dense, sparse, keys, buffers, traffic, memory)
        return
    finite = all(all_finite(b) for b in buffers)
    flag = buffers[-1].new_full((1,), 0.0 if finite else 1.0)
    step.journal(in_place=not final)
    if sparse:
        ride = torch.cat([*(views[i].reshape(-1) for i in dense), flag])
        grads = [views[i] for i in sparse]
        agreed = lambda summed: bool(summed[-1] == 0)  # noqa: E731
        if scatter:
            done, moved = state.transport.scatter(keys, grads, memory, ride=ride, proceed=agreed)
            rank, world = state.rank, state.world_size
            for g, chunk in zip(grads, done or []):
                g.view(world, -1)[rank].copy_(chunk)
        else:
            # The means go straight into the bucket.
            done, moved = state.transport.run(
                keys, grads, memory, ride=ride, proceed=agreed, out=grads
            )
        moved.raw_bytes = 0  # the buckets' raw bytes are counted once, above
        traffic.add(moved)
        _write_mean(state, views, dense, ride[:-1])
        nonfinite = done is None
        if nonfinite:
            _dense_average(state, views, sparse, traffic)
    else:
        nonfinite = bool(_dense_average(state, views, dense, traffic, extra=flag) != 0)
    if nonfinite:
        traffic.extra["nonfinite"] = True
    step.record(traffic)


def _average_on_device(
    step: Step,
    views: list[Tensor],
    dense: list[int],
    sparse: list[int],
    keys: list[str],
    buffers: list[Tensor],
    traffic: TransportStats,
    memory: bool,
) -> None:
    """:func:`_average_parts` with no host read: the overflow flag rides in the first
    all-reduce round (or is summed on its own first, over a gathering transport), the
    exchange always completes, a bucket some rank
    overflowed gets a NaN in each average (so GradScaler skips the step), and the step's
    memory changes are undone on the device when it closes (``nonfinite_check="device"``)."""
    state = step.state
    flag = _nonfinite_on_device(buffers, buffers[-1].dtype)
    step.journal(in_place=True, on_device=True)
    ride = torch.cat([*(views[i].reshape(-1) for i in dense), flag])
    grads = [views[i] for i in sparse]
    with decided_on_device():  # codecs and fused paths read nothing back either
        _, moved = state.transport.run(keys, grads, memory, ride=ride, out=grads)
    _write_mean(state, views, dense, ride[:-1])
    bad = ride[-1:]
    # The averages are the same on every rank, so a non-finite one (an overflow in g + e, in
    # a cast or in the sum, which the input flag cannot see) marks the step on every rank.
    step.note_nonfinite(bad + _nonfinite_on_device(grads, bad.dtype))
    # One NaN per average is enough for GradScaler and the optimizer to see the overflow.
    mark = torch.where(bad > 0, float("nan"), 0.0)
    for v in views:
        if v.numel():
            v.view(-1)[:1].add_(mark.to(v.dtype))
    moved.raw_bytes = 0  # the buckets' raw bytes are counted once, by the caller's step
    traffic.add(moved)
    step.record(traffic)
