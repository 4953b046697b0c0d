"""Federated rounds with commhooks.federated.FederatedAverager: every rank is a client with a
non-IID share of the data and its own error-feedback memory; each round it takes local steps,
then sends its compressed model delta. Rank 0 reports the accuracy and each client's uplink.

    torchrun --standalone --nproc_per_node=4 examples/federated_clients.py --alpha 0.1
    commhooks-launch mpirun --np 2 -- examples/federated_clients.py --epochs 1
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import commhooks.mpi
from commhooks.data import dirichlet_split, load_digits
from commhooks.federated import FederatedAverager


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--compressor", default="sign", help="a compressor spec")
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet: smaller = more skew")
    ap.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    ap.add_argument("--local-steps", type=int, default=5, help="optimizer steps per round")
    ap.add_argument(
        "--participation", type=float, default=1.0, help="fraction of clients per round"
    )
    args = ap.parse_args()

    commhooks.mpi.init_from_launcher("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = load_digits()
    shard = dirichlet_split(y_tr, world, args.alpha)[rank]
    labels = torch.bincount(y_tr[shard], minlength=10)
    torch.manual_seed(0)  # the same initial model on every client
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    fed = FederatedAverager(
        model, args.compressor, local_steps=args.local_steps, participation=args.participation
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    rounds = max(1, args.epochs * (len(y_tr) // (32 * world)) // args.local_steps)
    for _ in range(rounds):
        if fed.begin_round():
            for _ in range(args.local_steps):
                idx = shard[torch.randint(len(shard), (32,), generator=g)]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
                opt.step()
        fed.end_round()

    # Each client's uplink (the rounds it took part in) and what dense deltas would have been.
    s = fed.stats()
    mine = torch.tensor(
        [s.uplink_bytes, s.raw_bytes, len(shard), *labels.tolist()], dtype=torch.int64
    )
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item() * 100
        print(
            f"{args.compressor}, Dirichlet alpha={args.alpha}, {rounds} rounds of "
            f"{args.local_steps} local steps: {acc:.2f}% test, ratio {s.ratio:.1f}x"
        )
        print("| client | samples | labels held (count per digit) | uplink bytes | dense bytes |")
        print("|---|---|---|---|---|")
        for c, t in enumerate(every):
            uplink, raw, n, *held = t.tolist()
            print(f"| {c} | {n} | {' '.join(map(str, held))} | {uplink:,} | {raw:,} |")
    dist.barrier()  # leave together: tearing gloo down while a peer still prints can abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
