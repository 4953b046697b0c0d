"""Lightning's ModelParallelStrategy (FSDP2) under torchrun with commhooks.fsdp registered."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from commhooks.integrations import stats_line
from commhooks.integrations.lightning import CompressedModelParallelStrategy


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 1))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy = CompressedModelParallelStrategy(
        "uniform:bits=4", min_numel=512,  # the hook's
        data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(256, 48, generator=g), torch.randn(256, generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Regressor(), DataLoader(data, batch_size=16))
    print(stats_line(strategy.compression_state, trainer.global_rank), flush=True)
