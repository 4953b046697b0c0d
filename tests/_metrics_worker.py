"""Run under torchrun by tests/test_metrics.py: a DDP model with ``log_every`` and, on rank 0, a
TensorBoardLogger; no logging set-up of its own. Argument: an output directory."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import pathlib
import sys

import torch
import torch.distributed as dist
from torch import nn

import commhooks.ddp
from commhooks.metrics import TensorBoardLogger

STEPS, START_ITER = 6, 2


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    if os.environ.get("COMMHOOKS_DEBUG"):
        logging.getLogger("commhooks").setLevel(logging.DEBUG)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    )
    state = commhooks.ddp.register(model, "topk:ratio=0.01", log_every=2, start_iter=START_ITER)
    tb = TensorBoardLogger(str(out / "tb"), every=1).attach(state) if rank == 0 else None
    g = torch.Generator().manual_seed(rank)
    per_step = []
    for _ in range(STEPS):
        model.zero_grad()
        x, y = torch.randn(16, 64, generator=g), torch.randint(10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        s = state.stats()
        per_step.append({**dataclasses.asdict(s), "ratio": s.ratio, "last_ratio": s.last_ratio})
    (out / f"rank{rank}.json").write_text(json.dumps(per_step))
    if tb is not None:
        tb.close()
    dist.barrier()  # rank 0 closes its event file first; a rank gone early can abort gloo
    del model, state
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
