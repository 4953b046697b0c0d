"""transformers Trainer: compress_trainer() registers the commhooks hook when training begins.

    torchrun --standalone --nproc_per_node=2 examples/hf_trainer.py      # CPU (gloo) or GPU
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py

A tiny GPT-2 built from a config trains a few steps on generated tokens: nothing is
downloaded (HF_HUB_OFFLINE=1). Each rank prints the hook's stats. Needs transformers:
pip install transformers.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from commhooks.integrations import stats_line
from commhooks.integrations.huggingface import compress_trainer


class Tokens(Dataset):
    """Generated token sequences; the labels are the inputs (causal LM)."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    torch.set_num_threads(1)
    config = GPT2Config(
        vocab_size=128,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, max_steps=8, learning_rate=1e-3,
            report_to=[], use_cpu=not torch.cuda.is_available(), save_strategy="no",
            logging_strategy="no", disable_tqdm=True, ddp_find_unused_parameters=False,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(128, 32, 128))
        callback = compress_trainer(trainer, "topk:ratio=0.05")
        trainer.train()
    print(stats_line(callback.compression_state, args.process_index), flush=True)


if __name__ == "__main__":
    main()
