"""A DDP + commhooks job started by plain ``mpirun`` through :mod:`commhooks.mpi`; each rank
writes ``OUT/rank{r}.json`` for test_mpi.py.

Usage: ``mpirun -np 2 python _mpi_worker.py OUT``.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import commhooks.ddp
import commhooks.mpi


def train(spec: str | None) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    )
    if spec is not None:
        commhooks.ddp.register(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(8):
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    world = commhooks.mpi.init_process_group()
    torch.set_num_threads(1)
    dense = train(None)
    lossless = train("topk:ratio=1.0")
    sign = train("sign")
    every = torch.empty(world.world_size * sign.numel())
    dist.all_gather_into_tensor(every, sign)
    result = {
        "world": vars(world) | {"env_rank": os.environ["RANK"]},
        "backend": dist.get_backend(),
        "lossless_vs_dense": (lossless - dense).abs().max().item(),
        "sign_replicas_equal": bool((every.view(world.world_size, -1) == sign).all()),
    }
    dist.barrier()
    gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
    dist.destroy_process_group()
    with open(os.path.join(sys.argv[1], f"rank{world.rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
