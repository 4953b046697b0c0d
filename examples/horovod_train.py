"""Horovod training with commhooks' DistributedOptimizer, started by horovodrun.

    horovodrun -np 2 --gloo python examples/horovod_train.py --compressor sign
    horovodrun -np 2 --mpi  python examples/horovod_train.py --compressor powersgd:rank=2

Each rank trains on its non-IID share of scikit-learn's digits; rank 0 prints the accuracy,
the last loss and the optimizer's byte counts. Seeded (model, data order, compressors), so
identical runs print identical lines.
"""

from __future__ import annotations

import argparse

import horovod.torch as hvd
import torch
from torch import nn

import commhooks.horovod as chvd
from commhooks.data import dirichlet_split, load_digits


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--compressor", default="topk:ratio=0.01", help="a compressor spec")
    ap.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    ap.add_argument(
        "--backward-passes-per-step", type=int, default=1, help="local gradient accumulation"
    )
    ap.add_argument("--seed", type=int, default=0, help="seeds the model and the data order")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_digits()
    shard = dirichlet_split(y_tr, hvd.size(), 0.5)[hvd.rank()]
    torch.manual_seed(args.seed)  # rank 0's initial model is broadcast below
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = chvd.DistributedOptimizer(
        opt, model.named_parameters(), compressor=args.compressor,
        backward_passes_per_step=args.backward_passes_per_step,
    )  # fmt: skip
    chvd.broadcast_initial_state(model.state_dict(), opt, root_rank=0)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + hvd.rank())
    passes = args.backward_passes_per_step
    loss = torch.tensor(float("nan"))
    for _ in range(args.epochs * (len(y_tr) // (32 * hvd.size() * passes))):
        opt.zero_grad()
        for _ in range(passes):
            idx = shard[torch.randint(len(shard), (32,), generator=g)]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
        opt.step()
    if hvd.rank() == 0:
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item() * 100
        s = opt.stats()
        print(f"compressor={args.compressor} test accuracy {acc:.2f}%, last loss {loss.item():.6f}")
        print(f"raw {s.raw_bytes:,} B, wire {s.wire_bytes:,} B, ratio {s.ratio:.1f}x")


if __name__ == "__main__":
    main()
