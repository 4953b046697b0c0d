"""Federated rounds on digits: accuracy and uplink bytes of FedAvg, compressed FedAvg, and
drift control (FedProx, SCAFFOLD) at a high number of local steps.

Usage: ``python benchmarks/federated_convergence.py [--seeds 0,1,2] [--only "a;b"] [--out F]``.

4 gloo ranks are 4 clients, each with a Dirichlet(alpha) label-skewed share of scikit-learn's
digits; an MLP 64-128-10; local SGD (lr 0.05, batch 32, no momentum). Every run has the same
budget of local steps per client, ``rounds * local_steps``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import accuracy_cells, by_label, write
from torch import nn

from commhooks.data import dirichlet_split, load_digits
from commhooks.federated import FederatedAverager

LR = 0.05


@dataclass(frozen=True)
class Run:
    """One row: a compressor spec and the FedConfig fields."""

    label: str
    spec: str
    rounds: int
    config: dict[str, Any] = field(default_factory=dict)


LOSSLESS = {"error_feedback": False}
RUNS: list[Run] = [
    Run("FedAvg H=10, dense", "identity", 100, {"local_steps": 10, **LOSSLESS}),
    Run("FedAvg H=10, topk 1% + EF", "topk:ratio=0.01", 100, {"local_steps": 10}),
    Run("FedAvg H=10, sign + EF", "sign", 100, {"local_steps": 10}),
    Run(
        "FedAvg H=10, topk 1% + EF, half the clients a round",
        "topk:ratio=0.01",
        100,
        {"local_steps": 10, "participation": 0.5},
    ),
    Run(
        "FedAvgM H=10, dense, server momentum 0.5",
        "identity",
        100,
        {"local_steps": 10, "server_momentum": 0.5, **LOSSLESS},
    ),
    Run("FedAvg H=100, dense", "identity", 10, {"local_steps": 100, **LOSSLESS}),
    Run(
        "FedProx H=100, dense, mu=0.01",
        "identity",
        10,
        {"local_steps": 100, "prox_mu": 0.01, **LOSSLESS},
    ),
    Run(
        "FedProx H=100, dense, mu=0.1",
        "identity",
        10,
        {"local_steps": 100, "prox_mu": 0.1, **LOSSLESS},
    ),
    Run(
        "SCAFFOLD H=100, dense",
        "identity",
        10,
        {"local_steps": 100, "scaffold": True, "local_lr": LR, **LOSSLESS},
    ),
    Run(
        "SCAFFOLD H=100, topk 1% + EF",
        "topk:ratio=0.01",
        10,
        {"local_steps": 100, "scaffold": True, "local_lr": LR},
    ),
]


@dataclass
class Result:
    label: str
    seed: int
    accuracy: float
    uplink_bytes: float
    dense_bytes: float
    seconds: float


def train_one(rank: int, world: int, data: tuple, run: Run, seed: int, alpha: float) -> Result:
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = data
    shard = dirichlet_split(y_tr, world, alpha, seed=seed)[rank]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    fed = FederatedAverager(model, run.spec, num_samples=len(shard), seed=seed, **run.config)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(run.rounds):
        if fed.begin_round():
            for _ in range(fed.config.local_steps):
                idx = shard[torch.randint(len(shard), (32,), generator=g)]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
                fed.correct_gradients()
                opt.step()
        fed.end_round()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean()) * 100
    s = fed.stats()
    n = sum(p.numel() for p in model.parameters())
    # What a dense client would upload in the rounds this one took part in (4 B per weight,
    # twice under SCAFFOLD, which also sends its variates).
    dense = 4.0 * n * s.participated * (2 if fed.config.scaffold else 1)
    return Result(run.label, seed, acc, s.uplink_bytes, dense, time.perf_counter() - t0)


def worker(rank: int, world: int, tmp: str, cfg: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        data = load_digits()
        results = [
            train_one(rank, world, data, r, seed, cfg["alpha"])
            for r in cfg["runs"]
            for seed in cfg["seeds"]
        ]
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, [asdict(r) for r in results])
        if rank == 0:
            with open(os.path.join(tmp, "results.json"), "w") as f:
                json.dump(everyone, f)
        dist.barrier()
    finally:
        gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
        dist.destroy_process_group()


def run(runs: list[Run], seeds: list[int], world: int = 4, alpha: float = 0.3) -> list[Result]:
    """Rank 0's results, with uplink bytes summed over clients."""
    cfg = {"runs": list(runs), "seeds": list(seeds), "alpha": alpha}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tmp, cfg), nprocs=world, join=True)
        with open(os.path.join(tmp, "results.json")) as f:
            per_rank = [[Result(**r) for r in rank] for rank in json.load(f)]
    out = []
    for row in zip(*per_rank):
        first = row[0]
        first.uplink_bytes = sum(r.uplink_bytes for r in row)
        first.dense_bytes = sum(r.dense_bytes for r in row)
        out.append(first)
    return out


def table(results: list[Result]) -> str:
    """Markdown: accuracy mean and spread per run, uplink bytes and their saving."""
    lines = [
        "| run | test accuracy % (mean) | min / max | uplink MB (all clients) | fewer bytes |",
        "|---|---|---|---|---|",
    ]
    for lab, rows in by_label(results).items():
        up = statistics.mean(r.uplink_bytes for r in rows)
        dense = statistics.mean(r.dense_bytes for r in rows)
        lines.append(f"| {lab} | {accuracy_cells(rows)} | {up / 1e6:.2f} | {dense / up:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--only", default="", help="labels to keep, separated by ';'")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    runs = [r for r in RUNS if not args.only or r.label in args.only.split(";")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    results = run(runs, seeds, alpha=args.alpha)
    md = table(results) + (
        f"\n\n4 clients, Dirichlet alpha={args.alpha}, seeds {seeds}; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    write(md, [asdict(r) for r in results], json_path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
