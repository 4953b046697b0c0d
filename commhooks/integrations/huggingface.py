"""transformers: a ``TrainerCallback`` that registers the commhooks hook when training begins.

``callback = compress_trainer(trainer, "topk:ratio=0.01")`` before ``trainer.train()``.

The Trainer wraps its model in DDP (through accelerate) inside ``train()`` and hands callbacks
the unwrapped model, so the callback holds the trainer and registers on
``trainer.model_wrapped`` in ``on_train_begin``, on CPU (gloo) and CUDA alike. Needs
``transformers`` (``pip install transformers``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "commhooks.integrations.huggingface needs transformers: pip install transformers"
    ) from e

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from commhooks.ddp import CompressionState
from commhooks.integrations._ddp import Spec, check_hook, find_ddp, register_on
from commhooks.integrations._resume import restore_state, save_state

__all__ = ["SIDE_FILE", "CompressionCallback", "compress_trainer"]

#: each rank's hook state, in every ``checkpoint-<step>`` folder the Trainer saves
SIDE_FILE = "commhooks-rank{rank}.pt"


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

    Checkpoints: every checkpoint the Trainer saves gets each rank's hook state
    (:meth:`CompressionState.state_dict`: error feedback, PowerSGD's Q, the step counter,
    stats) as ``commhooks-rank<r>.pt`` in its folder, and ``trainer.train(
    resume_from_checkpoint=...)`` loads it back (:meth:`attach` wraps ``trainer.train`` to
    learn the folder), so a resumed run continues as an uninterrupted one would, bit for bit.
    A checkpoint without these files resumes with a warning naming what restarts from zero.
    The files are per rank: resume with the same world size.

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
        self._resume_from: str | None = None  # the checkpoint train() resumes from

    def attach(self, trainer: Trainer) -> CompressionCallback:
        """Bind ``trainer`` and add this callback to it (if not added yet); returns self.

        Also wraps ``trainer.train`` to note the checkpoint it resumes from (callbacks are
        not told), whose hook state :meth:`on_train_begin` then loads."""
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        train = trainer.train
        if getattr(train, "_commhooks_callback", None) is not self:

            @functools.wraps(train)
            def resuming_train(*args: Any, **kwargs: Any) -> Any:
                given = args[0] if args else kwargs.get("resume_from_checkpoint")
                if given is True:
                    given = get_last_checkpoint(trainer.args.output_dir)
                self._resume_from = str(given) if given else None
                return train(*args, **kwargs)

            resuming_train._commhooks_callback = self  # type: ignore[attr-defined]
            trainer.train = resuming_train
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
        resume, self._resume_from = self._resume_from, None
        if resume is not None and self._compression_state is not None:
            side = os.path.join(resume, SIDE_FILE.format(rank=args.process_index))
            device = next(ddp.parameters()).device
            state = self._compression_state
            restore_state(state, side, device, resume, state.comm)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write this rank's hook state into the checkpoint folder the Trainer just saved."""
        if self._compression_state is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        side = os.path.join(folder, SIDE_FILE.format(rank=args.process_index))
        save_state(self._compression_state, side)


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
