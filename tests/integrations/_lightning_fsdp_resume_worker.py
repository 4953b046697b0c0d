"""Lightning's FSDP2 strategy under torchrun: 20 steps straight, checkpointed at step 10 by
ModelCheckpoint (a distributed checkpoint, the compression state in per-rank side files),
against a resume from step 10 to 20; then a resume from the same checkpoint without the side
files."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from _lightning_fsdp_worker import Regressor
from _resume_record import resume_record, run_lightning_resume
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from commhooks.integrations.lightning import CompressedModelParallelStrategy

STEPS = 20  # ten per epoch: 2 ranks x 10 batches of 8


def fit(out: str, steps: int, ckpt: str | None = None, every: int = 0) -> dict:
    torch.manual_seed(0)
    model = Regressor()
    strategy = CompressedModelParallelStrategy(
        "uniform:bits=4", min_numel=512,  # the hook's: error feedback on the 96x48 weight
        data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(160, 48, generator=g), torch.randn(160, generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[ModelCheckpoint(out, every_n_train_steps=every, save_top_k=-1)] if every else [],
        enable_checkpointing=bool(every),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt)
    state = strategy.compression_state
    record = resume_record(model, state.engine, seen)
    # The parameters are DTensor shards: compare the whole tensors (a collective).
    record["params"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    record["feedback_bytes"] = state.feedback_bytes()
    return record


if __name__ == "__main__":
    run_lightning_resume(fit, STEPS)
