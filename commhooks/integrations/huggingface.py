"""transformers: a ``TrainerCallback`` that registers the commhooks hook when training begins.

``callback = compress_trainer(trainer, "topk:ratio=0.01")`` before ``trainer.train()``.

The Trainer wraps its model in DDP (through accelerate) inside ``train()`` and hands callbacks
the unwrapped model, so the callback holds the trainer and registers on
``trainer.model_wrapped`` in ``on_train_begin``, on CPU (gloo) and CUDA alike. Needs
``transformers`` (``pip install transformers``).
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "commhooks.integrations.huggingface needs transformers: pip install transformers"
    ) from e

from torch import nn

from commhooks.ddp import CompressionState
from commhooks.integrations._ddp import Spec, check_hook, find_ddp, register_on

__all__ = ["CompressionCallback", "compress_trainer"]


class CompressionCallback(TrainerCallback):  # type: ignore[misc]
    """Registers the compression hook on the Trainer's DDP model at train begin.

    Args:
        compressor: a spec string (``"topk:ratio=0.01"``, ``"powersgd:rank=4"``), config or
            compressor; checked here.
        trainer: the Trainer whose ``model_wrapped`` to register on; :func:`compress_trainer`
            binds it (the Trainer does not exist yet when ``callbacks=[...]`` is built, so
            bind later with :meth:`attach`).
        wrapper: ``"fp16"`` or ``"bf16"`` to cast each bucket first; None sends fp32.
        **options: fields of :class:`commhooks.ddp.HookOptions` (``start_iter``,
            ``transport``, ``min_numel``, ``log_every``, ...).

    Tuning: ``start_iter`` counts hook calls (optimizer steps times gradient-accumulation
    syncs), not Trainer steps; a few hundred dense steps help a fresh model. Read
    :attr:`compression_state` ``.stats()`` after training for the bytes saved.

    Raises:
        ValueError: a bad compressor spec, wrapper or hook option (here).
        RuntimeError: at train begin, when no trainer is attached or the trainer's model is
            not wrapped in DDP (one process; DeepSpeed or FSDP).
    """

    def __init__(
        self,
        compressor: Spec = "topk:ratio=0.01",
        *,
        trainer: Trainer | None = None,
        wrapper: str | None = None,
        **options: Any,
    ) -> None:
        check_hook(compressor, wrapper, options)
        self._compressor = compressor
        self._wrapper = wrapper
        self._options = options
        self._trainer = trainer
        self._ddp: nn.Module | None = None
        self._compression_state: CompressionState | None = None

    def attach(self, trainer: Trainer) -> CompressionCallback:
        """Bind ``trainer`` and add this callback to it (if not added yet); returns self."""
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    @property
    def compression_state(self) -> CompressionState:
        """The hook's state (``.stats()``, ``.state_dict()``) on this rank.

        Raises:
            RuntimeError: before ``trainer.train()`` has begun.
        """
        if self._compression_state is None:
            raise RuntimeError(
                "compression_state: the hook is registered when trainer.train() begins; "
                "read it during or after train()"
            )
        return self._compression_state

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Register on ``trainer.model_wrapped`` (once per DDP module: train() may rerun)."""
        if self._trainer is None:
            raise RuntimeError(
                "CompressionCallback: no trainer attached; callbacks receive the unwrapped "
                "model, so register with compress_trainer(trainer, ...) or "
                "CompressionCallback(...).attach(trainer)"
            )
        ddp = find_ddp(
            self._trainer.model_wrapped,
            "trainer.model_wrapped",
            f"The Trainer runs world_size={args.world_size}, parallel_mode={args.parallel_mode}; "
            "launch several processes (torchrun --nproc_per_node=2 or accelerate launch "
            "--multi_gpu --num_processes 2).",
        )
        if ddp is not self._ddp:
            self._compression_state = register_on(
                ddp, self._compressor, self._wrapper, self._options
            )
            self._ddp = ddp


def compress_trainer(
    trainer: Trainer,
    compressor: Spec = "topk:ratio=0.01",
    *,
    wrapper: str | None = None,
    **options: Any,
) -> CompressionCallback:
    """Add a :class:`CompressionCallback` bound to ``trainer``; call before ``trainer.train()``.

    Args:
        trainer: the transformers ``Trainer``.
        compressor: a spec string, config or compressor.
        wrapper: ``"fp16"`` or ``"bf16"`` to cast each bucket first; None sends fp32.
        **options: fields of :class:`commhooks.ddp.HookOptions`.

    Returns:
        The callback; its ``compression_state`` exists once training has begun.
    """
    callback = CompressionCallback(compressor, wrapper=wrapper, **options)
    return callback.attach(trainer)
