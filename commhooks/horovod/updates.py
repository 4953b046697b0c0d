"""Update compression under Horovod: each rank's optimizer steps on its own gradients and the
updates are averaged through a compressor with error feedback (see :mod:`commhooks.updates`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from commhooks.engine.state import CompressionState
from commhooks.horovod.collectives import HorovodCollectives
from commhooks.horovod.optimizer import _names
from commhooks.updates import compress_updates_of, update_options

__all__ = ["compress_updates"]


def compress_updates(
    optimizer: torch.optim.Optimizer,
    compressor: Any,
    named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    process_set: Any = None,
    **options: Any,
) -> Any:
    """Average ``optimizer``'s updates over Horovod ranks through ``compressor``; returns
    ``optimizer`` changed in place (same class and state). Use it instead of
    ``DistributedOptimizer`` for adaptive optimizers, after ``broadcast_initial_state``.

    Args:
        optimizer: the plain optimizer (not a ``DistributedOptimizer``): its gradients stay
            each rank's own.
        compressor: a spec string such as ``"sign"``, a config or a compressor.
        named_parameters: ``model.named_parameters()``, naming the error-feedback memory
            (default: ``param.<i>`` in the optimizer's order).
        process_set: a Horovod process set (default: every rank).
        **options: fields of :class:`~commhooks.engine.HookOptions`, applied to the updates.

    Sparsifiers get the same default sparsity warm-up
    (:data:`~commhooks.updates.SPARSE_WARMUP`), and tuning is as for
    :func:`commhooks.ddp.compress_updates`.
    """
    built, options = update_options(compressor, options)
    state = CompressionState(
        built,
        comm=HorovodCollectives(process_set),
        named_parameters=_names(optimizer, named_parameters),
        **options,
    )
    return compress_updates_of(optimizer, state)
