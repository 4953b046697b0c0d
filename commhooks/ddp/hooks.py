"""The DDP front end: the communication hook, half-precision wrappers and the one-line
``register``, a thin adapter over :mod:`commhooks.engine`.

No ``from __future__ import annotations`` here: torch checks at registration that a hook's
``bucket`` parameter is annotated with the real ``dist.GradBucket`` class, not a string.
"""

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.engine.average import average_bucket, average_flat
from commhooks.engine.state import CompressionState
from commhooks.kernels import dispatch

__all__ = [
    "WRAPPERS",
    "bf16_wrapper",
    "check_model",
    "check_wrapper",
    "compression_hook",
    "fp16_wrapper",
    "register",
]

Hook = Callable[[Any, dist.GradBucket], "Future[Tensor]"]

# Per state, the futures of the current step's buckets: the last bucket waits for them, so
# that a job that failed on the worker raises its own exception from backward. (DDP's reducer
# reads a failed Python future as a value and reports "Unable to cast ... to Tensor".)
_PENDING: "weakref.WeakKeyDictionary[CompressionState, list[Future[Tensor]]]" = (
    weakref.WeakKeyDictionary()
)


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> Future[Tensor]:
    """Queue a bucket for averaging over ranks and return a future of its average.

    Use as ``model.register_comm_hook(state, compression_hook)`` (or through :func:`register`).
    The bucket goes to the state's communication worker, which exchanges buckets one at a time
    in the order DDP hands them over (the same on every rank), while backward goes on; DDP
    waits for the futures when backward has handed over every bucket; the last bucket's call
    waits for them itself, so that a failed exchange raises its own exception from backward
    (DDP would report it as "Unable to cast ... to Tensor"). Before
    ``state.options.start_iter`` steps a bucket is a plain dense all-reduce; afterwards its
    small and 1-D tensors go in one dense all-reduce and the rest through the state's
    transport, with error feedback per parameter (see :mod:`commhooks.engine.average`). With
    ``coalesce`` the buckets before the last are held and exchanged together with it.

    Under compiled autograd's Python reducer DDP passes ``(grad, param)`` instead of a bucket
    and ignores the return value; the gradient is then averaged in place before returning.
    (The annotation still says ``dist.GradBucket``: ``register_comm_hook`` accepts no other.)
    """
    if isinstance(bucket, tuple):
        grad, param = bucket
        flat = grad.reshape(-1) if grad.is_contiguous() else grad.contiguous().view(-1)
        state.bind()

        def job() -> None:
            key = state.key_of(param)
            average_flat(state.begin_tensor(key), flat, [key], [param.shape], final=False)

        state.worker.run(job, flat.device)
        if flat.data_ptr() != grad.data_ptr():
            grad.copy_(flat.view(grad.shape))
        fut: Future[Tensor] = Future()
        fut.set_result(grad)
        return fut

    buffer = bucket.buffer()
    params = list(bucket.parameters())
    first, last = bucket.index() == 0, bucket.is_last()
    state.bind(buffer)
    fut = state.worker.future(buffer.device)
    state.worker.submit(
        lambda: average_bucket(state, buffer, params, fut, first=first, last=last),
        buffer.device,
        future=fut,
    )
    pending = _PENDING.setdefault(state, [])
    if first:
        pending.clear()
    pending.append(fut)
    if last:
        # DDP waits for every bucket right after the last one anyway; waiting here instead
        # raises the first failed job's own exception (type and message) on this thread.
        _PENDING[state] = []
        for f in pending:
            f.wait()
    return fut


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


#: ``register(wrapper=...)``'s choices
WRAPPERS: dict[str, Callable[[Hook], Hook]] = {"fp16": fp16_wrapper, "bf16": bf16_wrapper}


def check_wrapper(wrapper: str | None) -> None:
    """Refuse a ``wrapper`` that is not None, ``"fp16"`` or ``"bf16"`` (a ValueError)."""
    if wrapper is not None and wrapper not in WRAPPERS:
        raise ValueError(f"wrapper={wrapper!r}: must be None, 'fp16' or 'bf16'")


def _check_gradients(model: nn.Module) -> None:
    """Refuse, before any collective, gradients the compressors cannot carry: complex ones
    (every codec works on real values; averaging their real views through a codec built for
    magnitudes and signs would be silently wrong) and sparse ones (``nn.Embedding(sparse=True)``:
    no bucket buffer to compress). Plain DDP, or ``sparse=False``, serves those models."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_complex():
            raise ValueError(
                f"model: parameter {name!r} is {p.dtype}; commhooks compresses real gradients "
                "only. Train it with plain DDP, or keep it as a real tensor of twice the size"
            )
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse:
            raise ValueError(
                f"model: {name or type(m).__name__} has sparse=True; its sparse gradients have "
                "no dense bucket to compress. Use sparse=False, or plain DDP"
            )


def check_model(model: nn.Module) -> None:
    """Refuse a model that is not a ``DistributedDataParallel`` module, or whose gradients the
    compressors cannot carry (a ValueError naming the parameter), and a ``COMMHOOKS_KERNELS``
    that names no kernel choice, before the first backward reads it."""
    dispatch.mode()
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"model: expected a DistributedDataParallel module, got {type(model).__name__}"
        )
    _check_gradients(model)


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
        **options: fields of :class:`~commhooks.engine.HookOptions`.
    """
    check_model(model)
    group = process_group if process_group is not None else model.process_group
    state = CompressionState(compressor, model=model, process_group=group, **options)
    check_wrapper(wrapper)
    hook = compression_hook if wrapper is None else WRAPPERS[wrapper](compression_hook)
    model.register_comm_hook(state, hook)
    state.announce()
    return state
