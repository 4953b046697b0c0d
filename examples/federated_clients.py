"""Federated-style training: every rank is a client with a non-IID share of the data and its
own error-feedback memory, sending compressed updates each step; reports uplink bytes per
client.

    torchrun --standalone --nproc_per_node=4 examples/federated_clients.py --alpha 0.1
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn

import commhooks.ddp
from commhooks.data import dirichlet_split, load_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressor", default="sign")
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet: smaller = more skew")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = load_digits()
    shard = dirichlet_split(y_tr, world, args.alpha)[rank]
    labels = torch.bincount(y_tr[shard], minlength=10)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    )
    state = commhooks.ddp.register(model, args.compressor)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    steps = args.epochs * (len(y_tr) // (32 * world))
    for _ in range(steps):
        idx = shard[torch.randint(len(shard), (32,), generator=g)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()

    # Each client's uplink: the bytes it handed to collectives, and what dense would have been.
    s = state.stats()
    mine = torch.tensor(
        [s.wire_bytes, s.raw_bytes, len(shard), *labels.tolist()], dtype=torch.int64
    )
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item() * 100
        print(f"{args.compressor}, Dirichlet alpha={args.alpha}, {steps} steps: {acc:.2f}% test")
        print("| client | samples | labels held (count per digit) | uplink bytes | dense bytes |")
        print("|---|---|---|---|---|")
        for c, t in enumerate(every):
            wire, raw, n, *held = t.tolist()
            print(f"| {c} | {n} | {' '.join(map(str, held))} | {wire:,} | {raw:,} |")
    # Free the DDP model (a reference cycle with its hook's state) while the group lives:
    # freed at exit instead, gloo can abort the process.
    del model, opt, state
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
