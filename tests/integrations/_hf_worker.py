"""transformers Trainer under torchrun: a plain nn.Module model, train() called twice."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from commhooks.integrations import stats_line
from commhooks.integrations.huggingface import compress_trainer


class Model(nn.Module):
    """What the Trainer needs of a model: a forward returning the loss from keyword inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(64, 32, generator=g), torch.randint(4, (64,), generator=g)
    data = [{"x": x, "labels": y} for x, y in zip(xs, ys)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, max_steps=3, report_to=[],
            use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )  # fmt: skip
        trainer = Trainer(model=Model(), args=args, train_dataset=data)
        callback = compress_trainer(trainer, "topk:ratio=0.1", start_iter=1)
        trainer.train()
        first = callback.compression_state
        trainer.train()  # the same DDP module: registered once, the stats go on
        assert callback.compression_state is first
    print(stats_line(callback.compression_state, args.process_index), flush=True)
