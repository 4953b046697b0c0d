"""What every integration shares: option checks, finding the DDP module, registering on it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch.distributed as dist
from torch import nn

import commhooks.ddp
from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.ddp.hooks import check_wrapper
from commhooks.registry import compressor as build_compressor

__all__ = ["HOOK_OPTIONS", "Spec", "check_hook", "find_ddp", "register_on"]

logger = logging.getLogger(__name__)

#: names of the :class:`~commhooks.ddp.HookOptions` fields
HOOK_OPTIONS = frozenset(f.name for f in dataclasses.fields(commhooks.ddp.HookOptions))

Spec = str | CompressorConfig | Compressor[Any]


def check_hook(compressor: Spec, wrapper: str | None, options: dict[str, Any]) -> None:
    """Check the compressor, wrapper and hook options now, before any process group exists.

    Raises:
        ValueError: naming the unknown option, the bad value or the bad compressor spec.
    """
    unknown = sorted(set(options) - HOOK_OPTIONS)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not an option of commhooks.ddp.HookOptions "
            f"(known: {', '.join(sorted(HOOK_OPTIONS))})"
        )
    check_wrapper(wrapper)
    build_compressor(compressor)
    commhooks.ddp.HookOptions(**options)


def find_ddp(model: Any, where: str, hint: str) -> nn.parallel.DistributedDataParallel:
    """Return the DistributedDataParallel module ``model`` is, or wraps through torch.compile.

    Args:
        model: what the framework handed over.
        where: names the field or attribute ``model`` came from, for the error.
        hint: how to get a DDP-wrapped model in this framework, for the error.

    Raises:
        RuntimeError: ``model`` is not wrapped in DistributedDataParallel (a single process
            with no process group, DeepSpeed, FSDP, ...): there is no DDP hook to register.
    """
    inner = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner
    raise RuntimeError(
        f"{where}: expected a model wrapped in DistributedDataParallel, got "
        f"{type(model).__name__}; no compression hook registered. {hint}"
    )


def register_on(
    ddp: nn.parallel.DistributedDataParallel,
    compressor: Spec,
    wrapper: str | None,
    options: dict[str, Any],
) -> commhooks.ddp.CompressionState:
    """Register the commhooks hook on ``ddp`` (any device) and return its state."""
    state = commhooks.ddp.register(ddp, compressor, wrapper=wrapper, **options)
    logger.info(
        "commhooks: %s registered on DistributedDataParallel (world size %d, device %s)",
        type(state.compressor).__name__,
        dist.get_world_size(ddp.process_group),
        next((p.device for p in ddp.parameters()), None),
    )
    return state
