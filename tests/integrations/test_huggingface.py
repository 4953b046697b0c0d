"""commhooks.integrations.huggingface on the real transformers Trainer, 2 CPU processes."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from _frameworks import TORCHRUN, assert_compressed, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainingArguments

from commhooks.integrations.huggingface import CompressionCallback, compress_trainer

HERE = pathlib.Path(__file__).resolve().parent


def test_compresses_on_cpu_under_torchrun_and_survives_a_second_train() -> None:
    stats = assert_compressed(run([*TORCHRUN, str(HERE / "_hf_worker.py")]))
    # Two train() calls of 3 steps each on one hook state.
    assert {steps for steps, _, _ in stats.values()} == {6}


def _single_process_trainer(tmp_path: pathlib.Path, **kwargs: object) -> Trainer:
    from _hf_worker import Model

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    data = [{"x": torch.randn(32), "labels": torch.tensor(1)} for _ in range(4)]
    return Trainer(model=Model(), args=args, train_dataset=data, **kwargs)


def test_refuses_a_single_process_trainer(tmp_path: pathlib.Path) -> None:
    trainer = _single_process_trainer(tmp_path)
    callback = compress_trainer(trainer, "sign")
    with pytest.raises(RuntimeError, match=r"trainer.model_wrapped: expected .*world_size=1"):
        trainer.train()
    with pytest.raises(RuntimeError, match="compression_state"):
        _ = callback.compression_state


def test_refuses_a_callback_with_no_trainer(tmp_path: pathlib.Path) -> None:
    trainer = _single_process_trainer(tmp_path, callbacks=[CompressionCallback("sign")])
    with pytest.raises(RuntimeError, match="no trainer attached"):
        trainer.train()


def test_refuses_bad_options_at_once() -> None:
    with pytest.raises(ValueError, match="log_every"):
        CompressionCallback("sign", log_every=-5)
    with pytest.raises(ValueError, match="startiter"):
        CompressionCallback("sign", startiter=3)
