"""accelerate: register the commhooks hook on the model ``accelerator.prepare()`` wrapped in DDP,
or :func:`commhooks.fsdp.register` on the one its FSDP2 plugin sharded.

``state = register_accelerate(accelerator, model, "topk:ratio=0.01")`` after ``prepare()``.

accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` takes only accelerate's own hook
names; this registers a commhooks hook instead, on CPU (gloo) and CUDA alike. Needs
``accelerate`` only to have produced ``model``; this module does not import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from commhooks.ddp import CompressionState
from commhooks.integrations._ddp import Spec, check_hook, find_ddp, register_on

if TYPE_CHECKING:
    from commhooks.fsdp import FSDPCompression

__all__ = ["register_accelerate"]


def register_accelerate(
    accelerator: Any,
    model: nn.Module,
    compressor: Spec = "topk:ratio=0.01",
    *,
    wrapper: str | None = None,
    **options: Any,
) -> CompressionState | FSDPCompression:
    """Register the compression hook on ``model`` as ``accelerator.prepare()`` returned it.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` (named in errors).
        model: the model ``accelerator.prepare()`` returned: a DistributedDataParallel module
            (possibly inside torch.compile) when the script runs on several processes, or a
            model sharded with ``fully_shard`` (accelerate's FSDP2 plugin,
            ``FullyShardedDataParallelPlugin(fsdp_version=2)``), which goes to
            :func:`commhooks.fsdp.register`.
        compressor: a spec string (``"topk:ratio=0.01"``, ``"powersgd:rank=4"``), config or
            compressor.
        wrapper: ``"fp16"`` or ``"bf16"`` to cast each bucket first; None sends fp32.
        **options: fields of :class:`commhooks.ddp.HookOptions` (``start_iter``,
            ``transport``, ``min_numel``, ``log_every``, ...).

    Tuning: as for :func:`commhooks.ddp.register`; ``start_iter`` of a few hundred dense steps
    helps a fresh model, and the returned state's ``stats().ratio`` shows what compression
    bought.

    Returns:
        The hook's :class:`~commhooks.ddp.CompressionState`, or under FSDP2 the
        :class:`~commhooks.fsdp.FSDPCompression`.

    Raises:
        ValueError: a bad compressor spec, wrapper or hook option.
        RuntimeError: ``model`` is not wrapped in DDP: accelerate runs one process (on a CPU
            machine without an accelerate config, ``accelerate launch --num_processes 2``
            starts one; add ``--multi_gpu``), or it uses DeepSpeed, FSDP or XLA.
    """
    check_hook(compressor, wrapper, options)
    if _sharded(model):
        if wrapper is not None:
            raise ValueError(
                f"wrapper={wrapper!r}: casts DDP buckets; under FSDP2 use "
                "MixedPrecisionPolicy(reduce_dtype=...) or the 'bf16' compressor"
            )
        import commhooks.fsdp
        from commhooks.fsdp.units import fsdp_root

        return commhooks.fsdp.register(fsdp_root(model, "model"), compressor, **options)
    kind = getattr(accelerator, "distributed_type", "?")
    procs = getattr(accelerator, "num_processes", "?")
    ddp = find_ddp(
        model,
        "model",
        f"The accelerator runs distributed_type={kind} on num_processes={procs}; launch "
        "several processes (on CPU: accelerate launch --multi_gpu --num_processes 2 script.py, "
        "or torchrun) and pass the model accelerator.prepare() returned.",
    )
    return register_on(ddp, compressor, wrapper, options)


def _sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module in it) was sharded with ``fully_shard``."""
    # Imported here: DDP users need no FSDP2 (a recent torch) to import this module.
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())
