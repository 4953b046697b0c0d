"""Our Horovod optimizer as 2 fake nodes x 2 ranks (``horovodrun --gloo -np 4 -H
localhost:2,127.0.0.1:2``: Horovod counts the two names as two hosts, so its local and cross
communicators are those of 2 nodes). Writes ``OUT/rank{r}.json``.

Usage: ``python _hvd_nodes.py OUT``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import horovod.torch as hvd
import torch
from torch import nn

from commhooks.horovod import DistributedOptimizer


def run(spec: str, topology: str) -> dict[str, Any]:
    """Three steps; the first step's averaged gradients, replica agreement, the layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), spec,
        topology=topology, min_numel=0, compress_1d=True,
    )  # fmt: skip
    first: list[torch.Tensor] = []
    for step in range(3):
        opt.zero_grad()
        g = torch.Generator().manual_seed(1000 * step + hvd.rank())
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.synchronize()
        first = first or [p.grad.clone() for p in model.parameters()]
        with opt.skip_synchronize():
            opt.step()
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = hvd.allgather(mine.unsqueeze(0))
    return {
        "first": first,
        "equal": bool((every == mine).all()),
        "layout": opt.compression_state.layout,
        "node_bytes": opt.stats().node_bytes,
    }


def main(out: str) -> None:
    hvd.init()
    torch.set_num_threads(1)
    flat = run("identity", "flat")
    hier = run("identity", "auto")
    topk = run("topk", "hierarchical")
    diff = max(float((a - b).abs().max()) for a, b in zip(flat["first"], hier["first"]))
    rec = {
        "local": [hvd.local_rank(), hvd.local_size()],
        "cross": [hvd.cross_rank(), hvd.cross_size()],
        "layouts": [flat["layout"], hier["layout"], topk["layout"]],
        "equal": [flat["equal"], hier["equal"], topk["equal"]],
        "node_bytes": [flat["node_bytes"], hier["node_bytes"], topk["node_bytes"]],
        "identity_vs_flat": diff,
    }
    with open(os.path.join(out, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main(sys.argv[1])
