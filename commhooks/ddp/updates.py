"""Update compression for DDP in one line: DDP stops averaging gradients, and the optimizer
averages its updates through a compressor instead (see :mod:`commhooks.updates`).

No ``from __future__ import annotations`` here: torch checks at registration that a hook's
``bucket`` parameter is annotated with the real ``dist.GradBucket`` class, not a string.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from commhooks.comm.transport import TransportStats, count_allreduce
from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.ddp.hooks import check_model
from commhooks.engine.average import goes_dense, param_views
from commhooks.engine.state import CompressionState
from commhooks.updates import check_owned, compress_updates_of, update_options

__all__ = ["compress_updates", "local_hook", "small_dense_hook"]


def local_hook(state: Any, bucket: dist.GradBucket) -> Future[Tensor]:
    """A DDP hook that leaves each rank's gradients its own: no communication."""
    fut: Future[Tensor] = Future()
    fut.set_result(bucket.buffer())
    return fut


def small_dense_hook(state: CompressionState, bucket: dist.GradBucket) -> Future[Tensor]:
    """A DDP hook that averages, in one dense all-reduce, the gradients of the tensors the
    engine would send dense anyway (small, 1-D), and leaves the others each rank's own."""
    buffer = bucket.buffer()
    views = param_views(buffer, list(bucket.parameters()))
    small = [v for v in views if goes_dense(state, v)]
    if small:
        flat = torch.cat([v.reshape(-1) for v in small])
        traffic = TransportStats(raw_bytes=flat.numel() * flat.element_size())
        state.bind().all_reduce(flat)
        count_allreduce(traffic, flat, state.world_size)
        # Counted in the step the optimizer's update exchange closes.
        state.current().record(traffic)
        flat.div_(state.world_size)
        for v, piece in zip(small, flat.split([v.numel() for v in small])):
            v.copy_(piece.view(v.shape))
    return local_hook(state, bucket)


def compress_updates(
    model: nn.parallel.DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    compressor: str | CompressorConfig | Compressor[Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    small_on_gradients: bool = True,
    **options: Any,
) -> Any:
    """Average ``optimizer``'s updates of ``model`` over ranks through ``compressor``, not
    its gradients; returns ``optimizer`` (changed in place: same class, same state).

    For adaptive optimizers (Adam, AdamW, Adagrad, Lion): each rank's optimizer sees its own
    dense gradients, so its moments are not inflated by compression noise, and the update it
    produces is compressed with error feedback. SGD gains nothing from it (its update is the
    gradient times the learning rate): use :func:`commhooks.ddp.register` there.

    Args:
        model: the ``DistributedDataParallel`` module (its parameters identical on every rank).
        optimizer: built over ``model.parameters()``; keep using it as before.
        compressor: a spec string such as ``"sign"``, a config or a compressor.
        process_group: defaults to the DDP model's process group.
        small_on_gradients: average the gradients of the tensors sent dense (small ones,
            biases, norm weights; see ``min_numel``, ``compress_1d``) in DDP's hook, as plain
            DDP does, so their optimizer state is the same on every rank; False averages
            their updates instead, like the rest.
        **options: fields of :class:`~commhooks.engine.HookOptions`, applied to the updates.
            Without ``feedback``, a compressor that keeps a ``ratio`` under 50% (top-k, DGC,
            random-k) gets :data:`~commhooks.updates.SPARSE_WARMUP`: the kept share falls
            from 50% to its own ratio over the first 30 steps.

    Tuning: error feedback (on by default for biased compressors) carries what each update
    lost into the next; pass ``error_feedback=True`` for unbiased ones (ternary, QSGD) too,
    whose noise Adam no longer averages. The sparsity warm-up matters because Adam puts its
    updates on one scale per element: a 1% sparsifier then sends each element about once in
    a hundred steps, and early in training, when the loss falls fastest, that delay costs
    most. It costs a fixed number of bytes, about what 4 dense steps send (top-k 1% over 300
    steps: 23x fewer bytes than dense instead of 34x); a short, steep warm-up bought as much
    as longer, gentler ones for fewer bytes. Pass ``feedback=commhooks.FeedbackConfig()``
    for none, or your own ``warmup_steps`` and ``warmup_ratio``. Checkpoint with
    ``optimizer.state_dict()``: it holds this rank's moments, error feedback and place in
    the warm-up, so each rank saves its own. Under a GradScaler, a step on which any rank
    overflowed is skipped on every rank (the ranks agree on it in one small all-reduce).
    Groups added with ``optimizer.add_param_group`` have their updates averaged too.

    Raises:
        ValueError: ``model`` is not DDP, or ``optimizer`` misses some of its trainable
            parameters (named): DDP's hook no longer averages their gradients.
    """
    check_model(model)
    check_owned(optimizer, model.module)  # before the hook is registered
    group = process_group if process_group is not None else model.process_group
    built, options = update_options(compressor, options)
    state = CompressionState(built, model=model, process_group=group, **options)
    if small_on_gradients:
        model.register_comm_hook(state, small_dense_hook)
    else:
        model.register_comm_hook(None, local_hook)
    return compress_updates_of(
        optimizer, state, small_averaged=small_on_gradients, module=model.module
    )
