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

from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.ddp.hooks import check_model
from commhooks.engine.state import CompressionState
from commhooks.updates import compress_updates_of

__all__ = ["compress_updates", "local_hook"]


def local_hook(state: Any, bucket: dist.GradBucket) -> Future[Tensor]:
    """A DDP hook that leaves each rank's gradients its own: no communication."""
    fut: Future[Tensor] = Future()
    fut.set_result(bucket.buffer())
    return fut


def compress_updates(
    model: nn.parallel.DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    compressor: str | CompressorConfig | Compressor[Any],
    *,
    process_group: dist.ProcessGroup | None = None,
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
        **options: fields of :class:`~commhooks.engine.HookOptions`, applied to the updates.

    Tuning: error feedback (on by default for biased compressors) carries what each update
    lost into the next; pass ``error_feedback=True`` for unbiased ones (ternary, QSGD) too,
    whose noise Adam no longer averages. Checkpoint with ``optimizer.state_dict()``: it holds
    this rank's moments and error feedback, so each rank saves its own. A GradScaler that
    skips a step on one rank only would desynchronise the parameters: use bf16 or fp32.
    """
    check_model(model)
    group = process_group if process_group is not None else model.process_group
    state = CompressionState(compressor, model=model, process_group=group, **options)
    model.register_comm_hook(None, local_hook)
    return compress_updates_of(optimizer, state)
