"""Test accuracy of DDP training on real data with every compressor, against dense DDP.

Usage: ``python benchmarks/ddp_convergence.py [--seeds 0,1,2] [--epochs 40] [--out F.json]``.

scikit-learn's bundled digits (1797 8x8 images, no download) are split 80/20 into train and
test sets; the training set is dealt to the ranks as non-IID clients, Dirichlet(alpha) over the
labels. Each of ``world`` gloo ranks (4 by default) trains a 64-128-10 MLP under DDP with
SGD + momentum, every step drawing a batch from its own shard. Every compressor runs at its
defaults with error feedback, through :func:`commhooks.ddp.register`; top-k without error
feedback is the control that must come out worse. ``docs/ddp.md`` quotes the table this
prints; ``tests/ddp/test_convergence.py`` runs a smaller version.
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

import commhooks
import commhooks.ddp
from commhooks.data import dirichlet_split, load_digits


@dataclass(frozen=True)
class Run:
    """One row: ``spec`` None is dense DDP; ``options`` go to :func:`commhooks.ddp.register`;
    ``momentum`` is the optimizer's (0 where error feedback holds the momentum instead)."""

    label: str
    spec: str | None
    options: dict[str, Any] = field(default_factory=dict)
    momentum: float = 0.9


# DGC's momentum correction: the momentum lives in the error-feedback memory, before
# compression, and the optimizer runs without it.
MOMENTUM_IN_EF = {"feedback": commhooks.FeedbackConfig(momentum=0.9)}


RUNS: list[Run] = [
    Run("dense", None),
    *[Run(name, name) for name in commhooks.available() if name != "identity"],
    Run("topk, no EF", "topk", {"error_feedback": False}),
    Run("qsgd, EF forced on", "qsgd", {"error_feedback": True}),
    Run("randomk:ratio=0.1", "randomk:ratio=0.1"),
    Run("dgc:ratio=0.01", "dgc:ratio=0.01"),
    Run("randomk, momentum in EF", "randomk", MOMENTUM_IN_EF, momentum=0.0),
    Run("randomk:ratio=0.1, momentum in EF", "randomk:ratio=0.1", MOMENTUM_IN_EF, momentum=0.0),
    Run("dgc, momentum in EF", "dgc", MOMENTUM_IN_EF, momentum=0.0),
]


@dataclass
class Result:
    label: str
    seed: int
    accuracy: float
    ratio: float
    wire_bytes_per_step: float
    seconds: float


def train_one(
    rank: int,
    world: int,
    data: tuple[torch.Tensor, ...],
    run: Run,
    seed: int,
    epochs: int,
    alpha: float,
    batch: int = 32,
    lr: float = 0.05,
) -> tuple[float, float, float]:
    """Train once; returns (test accuracy, compression ratio, wire bytes per step)."""
    x_tr, y_tr, x_te, y_te = data
    shard = dirichlet_split(y_tr, world, alpha, seed=seed)[rank]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    state = None
    if run.spec is not None:
        state = commhooks.ddp.register(ddp, run.spec, seed=seed, **run.options)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=run.momentum)
    steps_per_epoch = -(-len(y_tr) // (world * batch))
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(epochs * steps_per_epoch):
        idx = shard[torch.randint(len(shard), (batch,), generator=g)]
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(x_te).argmax(1) == y_te).float().mean()) * 100
    if state is None:
        n = sum(p.numel() for p in model.parameters())
        return accuracy, 1.0, 4.0 * n
    stats = state.stats()
    return accuracy, stats.ratio, stats.wire_bytes / stats.steps


def worker(rank: int, world: int, tmp: str, cfg: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        data = load_digits()
        results = []
        for r in cfg["runs"]:
            for seed in cfg["seeds"]:
                t0 = time.perf_counter()
                acc, ratio, wire = train_one(
                    rank, world, data, r, seed, cfg["epochs"], cfg["alpha"], cfg["batch"], cfg["lr"]
                )
                results.append(Result(r.label, seed, acc, ratio, wire, time.perf_counter() - t0))
        if rank == 0:
            with open(os.path.join(tmp, "results.json"), "w") as f:
                json.dump([asdict(r) for r in results], f)
        # Ranks leave together: one tearing gloo down while another is mid-send aborts it.
        dist.barrier()
    finally:
        gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
        dist.destroy_process_group()


def run(
    runs: list[Run] = RUNS,
    seeds: list[int] = (0, 1, 2),  # type: ignore[assignment]
    epochs: int = 40,
    world: int = 4,
    alpha: float = 0.5,
    batch: int = 32,
    lr: float = 0.05,
) -> list[Result]:
    """Spawn ``world`` gloo ranks, train every run for every seed, return rank 0's results.

    ``batch`` is per rank and per step; ``lr`` is SGD's learning rate."""
    cfg = {"runs": list(runs), "seeds": list(seeds), "epochs": epochs, "alpha": alpha,
           "batch": batch, "lr": lr}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tmp, cfg), nprocs=world, join=True)
        with open(os.path.join(tmp, "results.json")) as f:
            return [Result(**r) for r in json.load(f)]


def table(results: list[Result]) -> str:
    """Markdown: accuracy mean, spread and gap to dense per run, with bytes."""
    by = by_label(results)
    dense = statistics.mean(r.accuracy for r in by["dense"]) if "dense" in by else None
    lines = [
        "| run | test accuracy % (mean) | min / max | vs dense (points) | wire bytes / step "
        "| ratio |",
        "|---|---|---|---|---|---|",
    ]
    for lab, rows in by.items():
        mean = statistics.mean(r.accuracy for r in rows)
        gap = f"{mean - dense:+.2f}" if dense is not None else "n/a"
        wire = statistics.mean(r.wire_bytes_per_step for r in rows)
        ratio = statistics.mean(r.ratio for r in rows)
        lines.append(f"| {lab} | {accuracy_cells(rows)} | {gap} | {wire:,.0f} | {ratio:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32, help="per rank and step")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--only", default="", help="run labels to keep, separated by ';'")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    runs = [r for r in RUNS if not args.only or r.label in args.only.split(";")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    results = run(runs, seeds, args.epochs, args.world, args.alpha, args.batch, args.lr)
    md = table(results) + (
        f"\n\n{args.world} ranks, Dirichlet alpha={args.alpha}, {args.epochs} epochs, "
        f"seeds {seeds}; {time.perf_counter() - t0:.0f} s"
    )
    write(md, [asdict(r) for r in results], json_path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
