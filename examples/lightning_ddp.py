"""Lightning: pass commhooks' state and hook to DDPStrategy, no glue.

    python examples/lightning_ddp.py        # 2 CPU processes

Lightning is not a commhooks dependency: pip install lightning.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from commhooks.ddp import CompressionState, compression_hook


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
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 64, generator=g), torch.randint(10, (512,), generator=g))
    # The state names parameters by the order the hook meets them (no model needed here).
    strategy = DDPStrategy(
        process_group_backend="gloo",
        ddp_comm_state=CompressionState("sign"),
        ddp_comm_hook=compression_hook,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Net(), DataLoader(data, batch_size=32))


if __name__ == "__main__":
    main()
