"""``make demo``: 4 gloo workers (torchrun) train on non-IID shares of scikit-learn's digits,
once dense and once per featured compressor, and compare accuracy, bytes and step time.

    commhooks-demo                               # or: python -m commhooks.demo
    commhooks-demo --rate 20mbit --hidden 1024   # the same, each rank in a shaped namespace

Writes ``OUT/results.json``, ``OUT/accuracy_vs_bytes.png`` and TensorBoard logs in
``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``), and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DEFAULT_RUNS", "Curve", "main"]

#: label -> spec (None: plain DDP); the featured compressors, each at its defaults plus EF auto
DEFAULT_RUNS: dict[str, str | None] = {
    "dense": None,
    "topk 1% + EF": "topk:ratio=0.01",
    "uniform 4-bit + EF": "uniform:bits=4",
    "sign + EF": "sign",
    "powersgd rank 2": "powersgd:rank=2",
}


@dataclass
class Curve:
    """One run as rank 0 saw it: per-epoch accuracy against cumulative bytes this rank sent."""

    label: str
    spec: str | None
    epochs: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    sent_bytes: list[float] = field(default_factory=list)
    wire_bytes_per_step: float = 0.0
    ratio: float = 1.0
    step_ms: float = 0.0


# -- the worker: one per rank, started by torchrun ------------------------------------------


def _train(
    label: str, spec: str | None, args: argparse.Namespace, data: tuple[torch.Tensor, ...],
    bar: Any, writer_dir: str | None,
) -> Curve:  # fmt: skip
    import commhooks.ddp
    from commhooks.data import dirichlet_split

    rank, world = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = data
    shard = dirichlet_split(y_tr, world, args.alpha, seed=args.seed)[rank]
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    state = commhooks.ddp.register(ddp, spec, seed=args.seed) if spec else None
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    n_params = sum(p.numel() for p in model.parameters())
    steps = -(-len(y_tr) // (world * args.batch))
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    writer = None
    if writer_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(writer_dir, re.sub(r"[^A-Za-z0-9.-]+", "_", label)))
    curve, train_s, step = Curve(label, spec), 0.0, 0
    for epoch in range(1, args.epochs + 1):
        for _ in range(steps):
            idx = shard[torch.randint(len(shard), (args.batch,), generator=g)]
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            train_s += time.perf_counter() - t0
            step += 1
            if bar is not None:
                bar.update(1)
        with torch.no_grad():
            acc = float((model(x_te).argmax(1) == y_te).float().mean()) * 100
        sent = state.stats().wire_bytes if state else 4.0 * n_params * step
        curve.epochs.append(epoch)
        curve.accuracy.append(acc)
        curve.sent_bytes.append(float(sent))
        if bar is not None:
            bar.set_postfix(run=label, acc=f"{acc:.1f}")
        if writer is not None:
            writer.add_scalar("accuracy", acc, step)
            writer.add_scalar("sent_bytes", sent, step)
            if state is not None:
                st = state.stats()
                writer.add_scalar("compression_ratio", st.ratio, step)
                writer.add_scalar("compress_s", st.compress_s, step)
                writer.add_scalar("comm_s", st.comm_s, step)
                writer.add_scalar("decompress_s", st.decompress_s, step)
    if writer is not None:
        writer.close()
    curve.wire_bytes_per_step = curve.sent_bytes[-1] / step
    curve.ratio = state.stats().ratio if state else 1.0
    curve.step_ms = 1e3 * train_s / step
    return curve


def worker(args: argparse.Namespace) -> None:
    """One rank: train every run in turn; rank 0 shows progress and writes the results."""
    from commhooks.data import load_digits

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        data = load_digits(seed=args.seed)
        runs = json.loads(args.runs_json)
        bar = None
        if rank == 0:
            from tqdm import tqdm

            steps = -(-len(data[1]) // (world * args.batch))
            bar = tqdm(total=len(runs) * args.epochs * steps, unit="step", file=sys.stderr)
        tb = os.path.join(args.out, "tensorboard") if rank == 0 else None
        curves = [_train(label, spec, args, data, bar, tb) for label, spec in runs.items()]
        if bar is not None:
            bar.close()
        if rank == 0:
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump([dataclasses.asdict(c) for c in curves], f, indent=1)
        dist.barrier()
    finally:
        gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
        dist.destroy_process_group()


# -- the driver ---------------------------------------------------------------------------------


def table(curves: list[Curve]) -> str:
    """Markdown: final accuracy, wire bytes per step, ratio and step time per run."""
    dense = next((c for c in curves if c.spec is None), None)
    lines = [
        "| run | test accuracy % | wire bytes / step | ratio | step ms | vs dense step |",
        "|---|---|---|---|---|---|",
    ]
    for c in curves:
        rel = f"{c.step_ms / dense.step_ms:.2f}" if dense else "n/a"
        lines.append(
            f"| {c.label} | {c.accuracy[-1]:.2f} | {c.wire_bytes_per_step:,.0f} | "
            f"{c.ratio:.1f} | {c.step_ms:.2f} | {rel} |"
        )
    return "\n".join(lines)


def plot(curves: list[Curve], path: str, world: int) -> None:
    """Accuracy against cumulative bytes sent per rank, log x axis, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        ax.plot([b / 1e6 for b in c.sent_bytes], c.accuracy, marker=".", label=c.label)
    ax.set_xscale("log")
    ax.set_xlabel("MB sent by one rank (cumulative, log scale)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"digits, {world} non-IID clients: accuracy against bytes sent")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="commhooks-demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="demo-out", help="folder for results, plot, TensorBoard")
    ap.add_argument("--world", type=int, default=4, help="ranks (clients)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--runs",
        default="",
        help="'label=spec;...' ('dense': plain DDP); default: featured",
    )
    ap.add_argument("--rate", default=None, help="run over shaped links at this tc rate (root)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="with --rate: one-way delay")
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runs-json", default="", help=argparse.SUPPRESS)
    return ap


def _runs(text: str) -> dict[str, str | None]:
    if not text:
        return dict(DEFAULT_RUNS)
    runs: dict[str, str | None] = {}
    for item in filter(None, text.split(";")):
        label, _, spec = item.partition("=")
        spec = spec or label
        runs[label] = None if spec == "dense" else spec
    return runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import commhooks

    runs = _runs(args.runs)
    for spec in runs.values():
        if spec is not None:
            commhooks.compressor(spec)  # a bad spec fails here, before any process starts
    if args.world < 2:
        raise ValueError(f"world={args.world}: needs at least 2 ranks")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    script = [
        "-m", "commhooks.demo", "--worker", "--out", out, "--runs-json", json.dumps(runs),
        "--epochs", str(args.epochs), "--hidden", str(args.hidden), "--batch", str(args.batch),
        "--alpha", str(args.alpha), "--seed", str(args.seed),
    ]  # fmt: skip
    from commhooks.launch import commands

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    if args.rate is None:
        cmd = commands.torchrun(script, args.world)
        print(commands.quote(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, env=env, timeout=args.timeout_s)
    else:
        from commhooks.launch.cli import shaped_commands
        from commhooks.launch.netns import Link, ShapedCluster

        cluster = ShapedCluster(args.world, Link(args.rate, args.delay_ms))
        cmds = shaped_commands(cluster, script, random.randint(20000, 59999))
        for i, c in enumerate(cmds):
            print(commands.quote([*cluster.exec_prefix(i), *c]), file=sys.stderr)
        with cluster:
            codes = cluster.run(cmds, env={"OMP_NUM_THREADS": "1"}, timeout_s=args.timeout_s)
        if any(codes):
            raise RuntimeError(f"demo ranks exited with {codes}")
    with open(os.path.join(out, "results.json")) as f:
        curves = [Curve(**c) for c in json.load(f)]
    plot(curves, os.path.join(out, "accuracy_vs_bytes.png"), args.world)
    link = f"shaped {args.rate}, +{args.delay_ms} ms" if args.rate else "loopback, unshaped"
    print(table(curves))
    print(
        f"\n{args.world} gloo ranks ({link}), digits, Dirichlet alpha={args.alpha}, MLP "
        f"64-{args.hidden}-10, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s. "
        f"Plot: {os.path.join(args.out, 'accuracy_vs_bytes.png')}; "
        f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'tensorboard')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
