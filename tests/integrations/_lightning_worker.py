"""Lightning under torchrun: hook options and DDPStrategy arguments given together."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from commhooks.integrations import stats_line
from commhooks.integrations.lightning import CompressedDDPStrategy


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(48, 96)
        self.head = nn.Linear(96, 1)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.body(x))).squeeze(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy = CompressedDDPStrategy(
        "uniform:bits=4", wrapper="bf16", start_iter=2, min_numel=512,  # the hook's
        process_group_backend="gloo", find_unused_parameters=False,  # DDPStrategy's
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(256, 48, generator=g), torch.randn(256, generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Regressor(), DataLoader(data, batch_size=16))
    print(stats_line(strategy.compression_state, trainer.global_rank), flush=True)
