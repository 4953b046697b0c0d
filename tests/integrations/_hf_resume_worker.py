"""transformers Trainer under torchrun: 10 steps straight, checkpointed every 5 (the hook's
state in per-rank files in each checkpoint folder), against a resume from checkpoint-5 to
10; then a resume from it without the files."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from _hf_worker import Model
from _resume_record import resume_record
from transformers import Trainer, TrainingArguments

from commhooks.integrations.huggingface import compress_trainer


def train(out: str, resume: str | None = None) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(64, 32, generator=g), torch.randint(4, (64,), generator=g)
    data = [{"x": x, "labels": y} for x, y in zip(xs, ys)]
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=10, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=5, logging_strategy="no",
        disable_tqdm=True, ddp_find_unused_parameters=False,
    )  # fmt: skip
    model = Model()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = compress_trainer(trainer, "powersgd:rank=2", start_iter=3, min_numel=512)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return resume_record(model, callback.compression_state, seen)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    out = sys.argv[1]
    ckpt = os.path.join(out, "checkpoint-5")
    result = {"straight": train(out)}
    rank = dist.get_rank()
    result["sides"] = sorted(f for f in os.listdir(ckpt) if f.startswith("commhooks"))
    result["resumed"] = train(out, resume=ckpt)
    dist.barrier()
    os.remove(os.path.join(ckpt, f"commhooks-rank{rank}.pt"))  # saved without the hook state
    dist.barrier()
    result["bare"] = train(out, resume=ckpt)
    torch.save(result, os.path.join(out, f"result{rank}.pt"))
