"""One rank of a 2 nodes x 2 ranks job under torchrun (two torchrun invocations on this
machine, ``--nnodes 2 --nproc-per-node 2``): ``topology="auto"`` must find the nodes in
``LOCAL_WORLD_SIZE``. Writes ``rank{r}.json`` into the folder given as the argument."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import commhooks.ddp


def train(spec: str, topology: str) -> tuple[list[torch.Tensor], str, str]:
    """Three steps; returns the first step's averaged gradients, the parameters' digest and
    the state's layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    state = commhooks.ddp.register(ddp, spec, topology=topology, min_numel=0, compress_1d=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(dist.get_rank())
    first: list[torch.Tensor] = []
    for _ in range(3):
        opt.zero_grad()
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(ddp(x), y).backward()
        first = first or [p.grad.clone() for p in ddp.parameters()]
        opt.step()
    h = hashlib.blake2b(digest_size=16)
    for p in ddp.parameters():
        h.update(p.detach().numpy().tobytes())
    return first, h.hexdigest(), state.layout


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        flat, _, flat_layout = train("identity", "flat")
        hier, _, layout = train("identity", "auto")
        _, topk, topk_layout = train("topk", "auto")
        diff = max(float((a - b).abs().max()) for a, b in zip(flat, hier, strict=True))
        rec = {
            "rank": dist.get_rank(),
            "local_world_size": os.environ["LOCAL_WORLD_SIZE"],
            "layouts": [flat_layout, layout, topk_layout],
            "identity_vs_flat": diff,
            "topk_params": topk,
        }
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(rec, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
