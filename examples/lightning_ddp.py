"""Lightning: CompressedDDPStrategy registers the commhooks hook, on CPU as on CUDA.

    python examples/lightning_ddp.py                           # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=2 examples/lightning_ddp.py   # the same

Each rank prints the hook's stats after fit(). Needs Lightning: pip install lightning.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from commhooks.integrations import stats_line
from commhooks.integrations.lightning import CompressedDDPStrategy


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 64, generator=g), torch.randint(10, (512,), generator=g))
    # Hook options (start_iter, log_every, ...) and DDPStrategy's own arguments mix freely.
    strategy = CompressedDDPStrategy("topk:ratio=0.05", process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Net(), DataLoader(data, batch_size=32))
    print(stats_line(strategy.compression_state, trainer.global_rank), flush=True)


if __name__ == "__main__":
    main()
