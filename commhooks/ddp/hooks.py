"""The DDP communication hook, half-precision wrappers, and the one-line ``register``.

No ``from __future__ import annotations`` here: torch checks at registration that a hook's
``bucket`` parameter is annotated with the real ``dist.GradBucket`` class, not a string.
"""

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from commhooks.comm.transport import AllReduceTransport, TransportStats, count_allreduce
from commhooks.compressors.base import Compressor, CompressorConfig, all_finite
from commhooks.ddp.fallback import COMPRESSED
from commhooks.ddp.state import CompressionState

__all__ = ["average_buffer", "bf16_wrapper", "compression_hook", "fp16_wrapper", "register"]

Hook = Callable[[Any, dist.GradBucket], "Future[Tensor]"]


def _done(value: Tensor) -> Future[Tensor]:
    fut: Future[Tensor] = Future()
    fut.set_result(value)
    return fut


def _param_views(buffer: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Per-parameter views of a bucket's flat buffer, from the parameters' sizes.

    Sliced from ``buffer`` itself rather than ``bucket.gradients()``, so that a wrapper that
    swapped the buffer (``fp16_wrapper``) is honoured.
    """
    views, pos = [], 0
    for p in params:
        views.append(buffer[pos : pos + p.numel()].view(p.shape))
        pos += p.numel()
    return views


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> Future[Tensor]:
    """Compress a bucket's gradients, exchange them, and return their average over ranks.

    Use as ``model.register_comm_hook(state, compression_hook)`` (or through :func:`register`).
    Before ``state.options.start_iter`` steps it is a plain dense all-reduce. Afterwards the
    bucket's small and 1-D tensors go in one dense all-reduce and the rest through the state's
    transport, with error feedback per parameter. All collectives are issued here, in the same
    order on every rank. With ``coalesce`` (the default) the buckets before the last are held
    and exchanged together with it; their futures complete then. Otherwise the returned future
    is already complete, except on dense steps.

    Under compiled autograd's Python reducer DDP passes ``(grad, param)`` instead of a bucket
    and ignores the return value; the gradient is then averaged in place. (The annotation
    still says ``dist.GradBucket``: ``register_comm_hook`` accepts no other.)
    """
    if isinstance(bucket, tuple):
        grad, param = bucket
        state.begin_tensor(state.key_of(param))
        flat = grad.reshape(-1) if grad.is_contiguous() else grad.contiguous().view(-1)
        state.check_agreement(flat.device)
        if state.iteration < state.options.start_iter:
            _dense_step(state, flat).wait()
        else:
            _average(state, flat, [param])
        if flat.data_ptr() != grad.data_ptr():
            grad.copy_(flat.view(grad.shape))
        return _done(grad)

    buffer = bucket.buffer()
    state.check_agreement(buffer.device)
    params = list(bucket.parameters())
    if state.iteration < state.options.start_iter:
        fut = _dense_step(state, buffer)
    elif state.fallback is not None:
        fut = _measured_step(state, buffer, params)
    elif state.options.coalesce and not bucket.is_last():
        if bucket.index() == 0:
            _drop_stale(state)
        # Completed when the last bucket arrives (DDP waits for every bucket's future only
        # after backward has handed over all of them).
        fut = Future()
        state.deferred.append((buffer, params, fut))
    else:
        _average_deferred(state, buffer, params)
        fut = _done(buffer)
    if bucket.is_last():
        state.end_step()
    return fut


def _drop_stale(state: CompressionState) -> None:
    """A step starts (DDP hands buckets over in index order) with buckets still held: the
    last step's backward stopped before its last bucket. Drop them, or their buffers, which
    DDP refills, would be averaged twice."""
    stale, state.deferred = state.deferred, []
    for _, _, fut in stale:
        fut.set_exception(RuntimeError("commhooks: backward ended before the last bucket"))


def _average_deferred(state: CompressionState, buffer: Tensor, params: list[Tensor]) -> None:
    """Average the held buckets and this one in one go, then complete the held futures."""
    held, state.deferred = state.deferred, []
    try:
        _average_parts(state, [*((b, p) for b, p, _ in held), (buffer, params)])
    except BaseException as e:
        for _, _, fut in held:
            fut.set_exception(e)
        raise
    for b, _, fut in held:
        fut.set_result(b)


def _measured_step(state: CompressionState, buffer: Tensor, params: list[Tensor]) -> Future[Tensor]:
    """``fallback="auto"``: probe both paths, then keep the faster (see ``ddp/fallback.py``)."""
    assert state.fallback is not None
    keys = tuple(state.key_of(p) for p in params)
    path, probe = state.fallback.plan(keys, state.comm, buffer.device)
    if probe:
        _sync(buffer)  # backward's queued kernels must not be charged to either path
    t0 = time.perf_counter()
    if path == COMPRESSED:
        _average(state, buffer, params)
        fut = _done(buffer)
    else:
        # Settled dense: what error feedback still holds for these tensors goes now; not on a
        # step GradScaler will skip, which would drop it.
        if not probe and state.feedback is not None and all_finite(buffer):
            for view, key in zip(_param_views(buffer, params), keys):
                residual = state.feedback.pop(key)
                if residual is not None:
                    view.add_(residual.to(view.dtype))
        fut = _dense_step(state, buffer)
        if probe:
            fut.wait()
    if probe:
        _sync(buffer)  # on CUDA, wait() only orders the stream: time the collective itself
        state.fallback.record(keys, path, time.perf_counter() - t0)
    return fut


def _sync(buffer: Tensor) -> None:
    if buffer.is_cuda:
        torch.cuda.synchronize(buffer.device)


def _dense_step(state: CompressionState, buffer: Tensor) -> Future[Tensor]:
    """A plain asynchronous all-reduce of the whole buffer (the ``start_iter`` warm-up)."""
    world = state.world_size
    step = TransportStats(raw_bytes=buffer.numel() * buffer.element_size())
    count_allreduce(step, buffer, world)
    state.record(step)
    fut = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))


def _dense_average(
    state: CompressionState,
    views: list[Tensor],
    idx: list[int],
    step: TransportStats,
    extra: Tensor | None = None,
) -> Tensor | None:
    """Average ``views[i]`` for ``i in idx`` in place with one all-reduce; ``extra`` rides
    along at the end and is returned summed over ranks."""
    tail = [extra] if extra is not None else []
    flat = torch.cat([*(views[i].reshape(-1) for i in idx), *tail])
    state.comm.all_reduce(flat)
    count_allreduce(step, flat, state.world_size)
    _write_mean(state, views, idx, flat[: flat.numel() - len(tail)])
    return flat[-1] if extra is not None else None


def _write_mean(
    state: CompressionState, views: list[Tensor], idx: list[int], summed: Tensor
) -> None:
    """Copy the sum over ranks of ``views[i]`` for ``i in idx`` (concatenated), divided by
    the world size, into them."""
    body = summed.div_(state.world_size)
    for i, piece in zip(idx, body.split([views[i].numel() for i in idx])):
        views[i].copy_(piece.view(views[i].shape))


def average_buffer(state: CompressionState, buffer: Tensor, params: list[Tensor]) -> None:
    """Average ``buffer`` (the concatenated gradients of ``params``) over ranks, in place and
    synchronously, through ``state.comm``: dense before ``start_iter``, compressed after.

    The front ends without a DDP reducer (Horovod's optimizer) call this once per step; it
    does not close the step (call ``state.end_step()``).
    """
    state.check_agreement(buffer.device)
    if state.iteration < state.options.start_iter:
        step = TransportStats(raw_bytes=buffer.numel() * buffer.element_size())
        _dense_average(state, [buffer], [0], step)
        state.record(step)
    else:
        _average(state, buffer, params)


def _average(state: CompressionState, buffer: Tensor, params: list[Tensor]) -> None:
    """Replace ``buffer`` (the concatenated gradients of ``params``) by its average over ranks."""
    _average_parts(state, [(buffer, params)])


def _average_parts(state: CompressionState, parts: list[tuple[Tensor, list[Tensor]]]) -> None:
    """:func:`_average` of several buffers (DDP buckets) with one set of collectives."""
    opts = state.options
    params = [p for _, ps in parts for p in ps]
    views = [v for b, ps in parts for v in _param_views(b, ps)]
    dense, sparse = [], []
    for i, v in enumerate(views):
        small = (
            v.numel() < opts.min_numel
            or (v.dim() <= 1 and not opts.compress_1d)
            or not state.pays(v)
        )
        (dense if small else sparse).append(i)

    # The small tensors' all-reduce also carries a count of ranks holding non-finite values,
    # so every rank learns of an overflow before anything is committed: such a step goes
    # dense (the optimizer and GradScaler see the inf/nan) and error feedback is not touched.
    # Over an all-reduce transport they ride in its first round (one collective fewer); the
    # round's work is then dropped on every rank alike.
    buffers = [b for b, _ in parts]
    step = TransportStats(raw_bytes=sum(b.numel() * b.element_size() for b in buffers))
    finite = all(all_finite(b) for b in buffers)
    flag = buffers[-1].new_full((1,), 0.0 if finite else 1.0)
    keys = [state.key_of(params[i]) for i in sparse]
    out: list[Tensor] | None = None
    moved: TransportStats | None = None
    if sparse and isinstance(state.transport, AllReduceTransport):
        ride = torch.cat([*(views[i].reshape(-1) for i in dense), flag])
        grads = [views[i] for i in sparse]
        # The means go straight into the bucket (nothing left to copy below).
        done, _, moved = state.transport.run_riding(
            keys, grads, ride, lambda summed: bool(summed[-1] == 0), out=grads
        )
        _write_mean(state, views, dense, ride[:-1])
        nonfinite = done is None
    else:
        nonfinite = bool(_dense_average(state, views, dense, step, extra=flag) != 0)
        if sparse and not nonfinite:
            out, moved = state.transport.run(keys, [views[i] for i in sparse])
    if sparse and nonfinite:
        _dense_average(state, views, sparse, step)
        step.extra["nonfinite"] = True
    if moved is not None:
        moved.raw_bytes = 0  # the buckets' raw bytes are counted once, above
        step.add(moved)
    if out is not None:
        for i, o in zip(sparse, out):
            views[i].copy_(o)
    state.record(step)


def _cast_wrapper(hook: Hook, dtype: torch.dtype) -> Hook:
    def wrapped(state: Any, bucket: dist.GradBucket) -> Future[Tensor]:
        original = bucket.buffer()
        bucket.set_buffer(original.to(dtype))
        fut = hook(state, bucket)

        def back(f: Future[Tensor]) -> Tensor:
            original.copy_(f.value())
            return original

        return fut.then(back)

    wrapped.__name__ = f"{dtype}_{getattr(hook, '__name__', 'hook')}"
    return wrapped


def fp16_wrapper(hook: Hook) -> Hook:
    """Run ``hook`` on an fp16 copy of each bucket, as torch's ``fp16_compress_wrapper`` does:
    the compressor then sees (and sends values as) fp16, error feedback stays fp32."""
    return _cast_wrapper(hook, torch.float16)


def bf16_wrapper(hook: Hook) -> Hook:
    """Like :func:`fp16_wrapper` with bfloat16 (fp32's range, 8 bits of mantissa)."""
    return _cast_wrapper(hook, torch.bfloat16)


def register(
    model: nn.parallel.DistributedDataParallel,
    compressor: str | CompressorConfig | Compressor[Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    wrapper: str | None = None,
    **options: Any,
) -> CompressionState:
    """Register a compression hook on a DDP model in one line and return its state.

    Args:
        model: the ``DistributedDataParallel`` module.
        compressor: a spec string such as ``"topk:ratio=0.01"``, a config or a compressor.
        process_group: defaults to the DDP model's process group.
        wrapper: ``"fp16"`` or ``"bf16"`` to cast each bucket first (see :func:`fp16_wrapper`).
        **options: fields of :class:`~commhooks.ddp.state.HookOptions`.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"model: expected a DistributedDataParallel module, got {type(model).__name__}"
        )
    group = process_group if process_group is not None else model.process_group
    state = CompressionState(compressor, model=model, process_group=group, **options)
    wrappers = {None: None, "fp16": fp16_wrapper, "bf16": bf16_wrapper}
    if wrapper not in wrappers:
        raise ValueError(f"wrapper={wrapper!r}: must be None, 'fp16' or 'bf16'")
    hook = compression_hook if wrapper is None else wrappers[wrapper](compression_hook)
    model.register_comm_hook(state, hook)
    return state
