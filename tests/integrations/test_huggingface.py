"""commhooks.integrations.huggingface on the real transformers Trainer, 2 CPU processes."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from _frameworks import assert_compressed, on_ranks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainingArguments

from commhooks.integrations.huggingface import CompressionCallback, compress_trainer

HERE = pathlib.Path(__file__).resolve().parent


def test_compresses_on_two_cpu_ranks_and_survives_a_second_train() -> None:
    stats = assert_compressed(on_ranks(HERE / "_hf_worker.py"))
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


def test_a_resumed_train_keeps_the_hook_state_bit_for_bit(tmp_path: pathlib.Path) -> None:
    """Checkpoints every 5 of 10 steps hold each rank's hook state; train(
    resume_from_checkpoint=checkpoint-5) ends with the parameters of the straight run, bit
    for bit, the hook's step counter and stats carried on. Without the files the resume
    warns, naming what restarts from zero, and lands elsewhere."""
    on_ranks(HERE / "_hf_resume_worker.py", str(tmp_path), timeout=600)
    for rank in range(2):
        res = torch.load(tmp_path / f"result{rank}.pt", weights_only=False)
        straight, resumed, bare = res["straight"], res["resumed"], res["bare"]
        assert res["sides"] == ["commhooks-rank0.pt", "commhooks-rank1.pt"]
        for a, b in zip(straight["params"], resumed["params"]):
            assert torch.equal(a, b)
        assert resumed["iteration"] == straight["iteration"] == 10
        for field in ("steps", "raw_bytes", "wire_bytes"):
            assert getattr(resumed["stats"], field) == getattr(straight["stats"], field)
        assert 0 < resumed["stats"].wire_bytes < resumed["stats"].raw_bytes
        assert resumed["warnings"] == []
        assert bare["iteration"] == 5
        assert not all(torch.equal(a, b) for a, b in zip(straight["params"], bare["params"]))
        assert any("restart from zero" in w and "step counter" in w for w in bare["warnings"])
