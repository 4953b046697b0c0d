"""Lightning: a ``DDPStrategy`` that registers the commhooks hook on CPU and CUDA alike, and a
``ModelParallelStrategy`` (FSDP2) that registers :func:`commhooks.fsdp.register`.

``Trainer(strategy=CompressedDDPStrategy("topk:ratio=0.01"), accelerator="cpu", devices=2)``;
``Trainer(strategy=CompressedModelParallelStrategy("uniform:bits=8", data_parallel_size=2,
tensor_parallel_size=1), ...)`` with a LightningModule whose ``configure_model`` calls
``fully_shard``.

Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` registers comm hooks only when the root
device is CUDA; this strategy registers right after Lightning wraps the module in DDP, whatever
the device. Needs ``lightning`` (``pip install lightning``); ``pytorch_lightning`` is not
supported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

try:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "commhooks.integrations.lightning needs Lightning: pip install lightning"
    ) from e

from commhooks.comm.collectives import Collectives, TorchCollectives
from commhooks.ddp import CompressionState
from commhooks.integrations._ddp import HOOK_OPTIONS, Spec, check_hook, find_ddp, register_on
from commhooks.integrations._resume import HookState, restore_state, save_state

if TYPE_CHECKING:
    from commhooks.fsdp import FSDPCompression

__all__ = ["CompressedDDPStrategy", "CompressedModelParallelStrategy"]

_LIGHTNING_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper")


class _SideFiles:
    """Checkpoints of a Lightning strategy that also hold each rank's compression state, in
    a side file per rank beside the checkpoint (``<path>.commhooks-rank<r>.pt``): written on
    every save, removed with the checkpoint, loaded on resume once compression is
    registered (see :mod:`commhooks.integrations._resume`)."""

    global_rank: int
    root_device: Any
    restore_checkpoint_after_setup: bool
    _resume_from: str | None

    def _hook_state(self) -> HookState | None:
        """This rank's compression state, once registered."""
        raise NotImplementedError

    def _hook_comm(self) -> Collectives:
        """Every rank that keeps a side file."""
        raise NotImplementedError

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Save as Lightning does, plus this rank's compression state beside it."""
        state = self._hook_state()
        if state is not None:
            save_state(state, _side_file(filepath, self.global_rank))
        super().save_checkpoint(  # type: ignore[misc]
            checkpoint, filepath, storage_options=storage_options
        )

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove as Lightning does, plus this rank's side file."""
        super().remove_checkpoint(filepath)  # type: ignore[misc]
        side = _side_file(filepath, self.global_rank)
        if os.path.isfile(side):
            os.remove(side)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Load as Lightning does; the compression state follows once it is registered."""
        # Lightning before 2.6 takes no weights_only.
        extra = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = super().load_checkpoint(checkpoint_path, **extra)  # type: ignore[misc]
        self._resume_from = str(checkpoint_path)
        if self._hook_state() is not None and self.restore_checkpoint_after_setup:
            self._restore()
        return checkpoint

    def teardown(self) -> None:
        self._resume_from = None
        super().teardown()  # type: ignore[misc]

    def _restore(self) -> None:
        """Load the compression state of the checkpoint being resumed from, if any (every
        rank)."""
        state, path = self._hook_state(), self._resume_from
        if state is None or path is None:
            return
        self._resume_from = None
        side = _side_file(path, self.global_rank)
        restore_state(state, side, self.root_device, path, self._hook_comm())


class CompressedDDPStrategy(_SideFiles, DDPStrategy):
    """Lightning's DDP strategy with the commhooks compression hook on every device.

    Args:
        compressor: a spec string (``"topk:ratio=0.01"``, ``"powersgd:rank=4"``, ``"sign"``),
            config or compressor; checked here, before training starts.
        wrapper: ``"fp16"`` or ``"bf16"`` casts each bucket before compressing (halves the
            dense part of the traffic too); None (the default) sends fp32.
        **kwargs: fields of :class:`commhooks.ddp.HookOptions` (``start_iter``, ``transport``,
            ``error_feedback``, ``min_numel``, ``log_every``, ...) go to the hook; everything
            else goes to ``DDPStrategy`` (``process_group_backend``, ``timeout``,
            ``find_unused_parameters``, ...). ``ddp_comm_state``, ``ddp_comm_hook`` and
            ``ddp_comm_wrapper`` are refused: this strategy owns the hook.

    Checkpoints: ``trainer.save_checkpoint(path)`` (and ``ModelCheckpoint``) also writes each
    rank's hook state (:meth:`CompressionState.state_dict`: error feedback, PowerSGD's Q, the
    step counter, stats) to ``<path>.commhooks-rank<r>.pt``, and ``fit(ckpt_path=path)``
    loads it back, so a resumed run continues as an uninterrupted one would, bit for bit. A
    checkpoint without these files resumes with a warning naming what restarts from zero.
    Keep the side files with the checkpoint; they are per rank, so resume with the same
    world size.

    Tuning: start with ``"topk:ratio=0.01"`` or ``"powersgd:rank=4"``; give ``start_iter`` a
    few hundred dense steps on a new model; ``log_every=100`` logs the stats as it trains.
    :attr:`compression_state` ``.stats()`` tells how many bytes went on the wire; a ratio near
    1 means the model's tensors are below ``min_numel`` or compression did not pay.

    Raises:
        ValueError: an unknown hook option, a bad value or compressor spec, or one of
            Lightning's own hook arguments.
    """

    def __init__(
        self, compressor: Spec = "topk:ratio=0.01", *, wrapper: str | None = None, **kwargs: Any
    ) -> None:
        refused = [name for name in _LIGHTNING_HOOK_ARGS if name in kwargs]
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: CompressedDDPStrategy registers its own hook; "
                "give the compressor and hook options instead"
            )
        self._hook_options = {k: v for k, v in kwargs.items() if k in HOOK_OPTIONS}
        check_hook(compressor, wrapper, self._hook_options)
        super().__init__(**{k: v for k, v in kwargs.items() if k not in HOOK_OPTIONS})
        self._compressor = compressor
        self._wrapper = wrapper
        self._compression_state: CompressionState | None = None
        self._resume_from: str | None = None  # a checkpoint loaded, its hook state not yet

    @property
    def compression_state(self) -> CompressionState:
        """The hook's state (``.stats()``, ``.state_dict()``) on this rank.

        Raises:
            RuntimeError: before ``trainer.fit()`` has wrapped the model in DDP.
        """
        if self._compression_state is None:
            raise RuntimeError(
                "compression_state: the hook is registered when trainer.fit() wraps the model "
                "in DistributedDataParallel; read it during or after fit()"
            )
        return self._compression_state

    def configure_ddp(self) -> None:
        """Wrap the module in DDP as Lightning does, then register the compression hook."""
        super().configure_ddp()
        ddp = find_ddp(
            self.model,
            "CompressedDDPStrategy.model",
            "Lightning's configure_ddp() did not wrap the module in DDP.",
        )
        self._compression_state = register_on(
            ddp, self._compressor, self._wrapper, self._hook_options
        )
        self._restore()

    def _hook_state(self) -> CompressionState | None:
        return self._compression_state

    def _hook_comm(self) -> Collectives:
        assert self._compression_state is not None
        return self._compression_state.comm


class CompressedModelParallelStrategy(_SideFiles, ModelParallelStrategy):
    """Lightning's FSDP2 strategy with :func:`commhooks.fsdp.register` on the module that
    ``configure_model`` ``fully_shard``-ed.

    Args:
        compressor: a spec string (``"uniform:bits=8"``, ``"bf16"``), config or compressor.
        **kwargs: fields of :class:`commhooks.ddp.HookOptions` go to
            :func:`commhooks.fsdp.register`; everything else to ``ModelParallelStrategy``
            (``data_parallel_size``, ``tensor_parallel_size``, ``process_group_backend``, ...).

    Checkpoints: ``trainer.save_checkpoint(path)`` (and ``ModelCheckpoint``) also writes each
    rank's compression state (:meth:`FSDPCompression.state_dict`: error feedback of its
    shard or of its units' gradients, the compressor's state, the step counter, stats) to
    ``<path>.commhooks-rank<r>.pt``, and ``fit(ckpt_path=path)`` loads it back once the model
    is set up, so a resumed run continues as an uninterrupted one would, bit for bit. Resume
    on the same mesh (another one raises a ``ValueError`` naming both); a checkpoint without
    the files resumes with a warning naming what restarts from zero.

    Tuning: see docs/fsdp.md: shard over ``device_mesh["data_parallel"]`` for the
    reduce-scatter mode, over :func:`commhooks.fsdp.node_mesh` for the hierarchical one.

    Raises:
        ValueError: an unknown hook option, a bad value or compressor spec; at ``fit()``, a
            module that is not ``fully_shard``-ed as :func:`commhooks.fsdp.register` needs.
    """

    def __init__(self, compressor: Spec = "uniform:bits=8", **kwargs: Any) -> None:
        self._hook_options = {k: v for k, v in kwargs.items() if k in HOOK_OPTIONS}
        check_hook(compressor, None, self._hook_options)
        super().__init__(**{k: v for k, v in kwargs.items() if k not in HOOK_OPTIONS})
        self._compressor = compressor
        self._compression: FSDPCompression | None = None
        self._resume_from: str | None = None  # a checkpoint loaded, its state not yet

    @property
    def compression_state(self) -> FSDPCompression:
        """The compression state (``.stats()``, ``.state_dict()``) on this rank.

        Raises:
            RuntimeError: before ``trainer.fit()`` has set the model up.
        """
        if self._compression is None:
            raise RuntimeError(
                "compression_state: registered when trainer.fit() sets the sharded model up; "
                "read it during or after fit()"
            )
        return self._compression

    def setup(self, trainer: Any) -> None:
        """Set the sharded model up as Lightning does, then register compression on it."""
        super().setup(trainer)
        # Imported here: DDP users need no FSDP2 (a recent torch) to import this module.
        import commhooks.fsdp
        from commhooks.fsdp.units import fsdp_root

        root = fsdp_root(self.lightning_module, "CompressedModelParallelStrategy.model")
        self._compression = commhooks.fsdp.register(root, self._compressor, **self._hook_options)
        self._restore()

    def _hook_state(self) -> FSDPCompression | None:
        return self._compression

    def _hook_comm(self) -> Collectives:
        # Every rank keeps a file; in the hierarchical mode the engine's group is one shard's
        # peers across nodes, so agree over the whole world.
        return TorchCollectives(None)


def _side_file(checkpoint: Any, rank: int) -> str:
    """Where rank ``rank`` keeps its hook state for ``checkpoint``."""
    return f"{checkpoint}.commhooks-rank{rank}.pt"
