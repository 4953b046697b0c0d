"""DDP step time with every commhooks compressor, against plain all-reduce and torch's fp16 hook.

Usage: ``.venv/bin/python benchmarks/ddp_step.py [--specs "topk;sign@coalesce=True"]
[--steps 5] [--warmup 1] [--reps 5] [--out F.json] [--markdown F.md] [--smoke]``

Two gloo ranks on the CPU (one thread each, rendezvous through a ``FileStore`` in a temporary
directory) each hold a DDP copy of the same ~8.4M-parameter MLP (1024-2048-2048-1024, ReLU) and
train it with SGD on seeded synthetic batches of 32, MSE against random targets. The variants
are ``allreduce`` (DDP without a hook), ``torch-fp16`` (torch's ``fp16_compress_hook``) and,
for every name in :func:`commhooks.available` (or each of ``--specs``), our hook at that
compressor's defaults and the default hook options, through :func:`commhooks.ddp.register`.

Every variant's model is built once, with a few untimed steps, and kept. Then, ``--reps``
times, every variant in turn runs ``--warmup`` untimed and ``--steps`` timed steps
(forward, backward with its communication, optimizer step) after a barrier; a rep's step time
is the slower rank's elapsed time over its steps. Interleaving the reps spreads machine noise
over all variants alike. A variant whose first untimed step takes more than ``--slow-s``
seconds runs one timed step per rep and no per-rep warm-up; the table marks it.

Reported per variant: step time min / median / max over reps, the median over the medians of
``allreduce`` and ``torch-fp16``, bytes handed to collectives per step and per rank (our
hook's ``last_wire_bytes``; 4 and 2 bytes per parameter for the baselines), the compression
ratio and, for our hook, compress + decompress and communication time per step. ``--smoke``
runs a small model for a few seconds, for tests.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import parse_variant, write
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import commhooks
import commhooks.ddp
from commhooks.ddp import CommStats, CompressionState

ALLREDUCE = "allreduce"
TORCH_FP16 = "torch-fp16"
WORLD = 2
SMOKE_SPECS = ["topk", "sign", "powersgd"]


@dataclass(frozen=True)
class Config:
    """What to run: model widths, batch, step counts and the variants' labels."""

    widths: tuple[int, ...] = (1024, 2048, 2048, 1024)
    batch: int = 32
    steps: int = 5
    warmup: int = 1
    build_steps: int = 2
    reps: int = 7
    slow_s: float = 3.0
    seed: int = 0
    timeout_s: float = 900.0
    variants: tuple[str, ...] = ()


@dataclass
class Row:
    """One variant's measurements (rank-averaged bytes and codec times, slowest-rank steps)."""

    label: str
    error_feedback: bool | None
    steps: int
    first_step_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    wire_bytes_per_step: float = 0.0
    ratio: float = 1.0
    codec_ms: float | None = None
    comm_ms: float | None = None
    slow: bool = False
    min_s: float = 0.0
    median_s: float = 0.0
    max_s: float = 0.0
    vs_allreduce: float | None = None
    vs_torch_fp16: float | None = None


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def n_params(widths: tuple[int, ...]) -> int:
    return sum(p.numel() for p in mlp(widths).parameters())


class Variant:
    """A DDP model with its hook (or none), optimizer and our hook's state if any."""

    def __init__(self, label: str, cfg: Config) -> None:
        torch.manual_seed(cfg.seed)  # every variant starts from the same weights
        self.label = label
        self.model = nn.parallel.DistributedDataParallel(mlp(cfg.widths))
        self.state: CompressionState | None = None
        if label == TORCH_FP16:
            self.model.register_comm_hook(dist.group.WORLD, default_hooks.fp16_compress_hook)
        elif label != ALLREDUCE:
            spec, options = parse_variant(label)
            self.state = commhooks.ddp.register(self.model, spec, **options)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.built: CommStats | None = None  # our hook's stats once built, before the reps

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        nn.functional.mse_loss(self.model(x), y).backward()
        self.opt.step()


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _timed_steps(v: Variant, batches: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> float:
    """Seconds per step of ``n`` steps on the slowest rank, after a barrier."""
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(n):
        v.step(*batches[i % len(batches)])
    return _max_over_ranks(time.perf_counter() - t0) / n


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def measure(rank: int, cfg: Config) -> list[Row]:
    """Build every variant, then run the interleaved reps; returns one row per variant."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    batches = [
        (
            torch.randn(cfg.batch, cfg.widths[0], generator=g),
            torch.randn(cfg.batch, cfg.widths[-1], generator=g),
        )
        for _ in range(4)
    ]
    variants: list[Variant] = []
    rows: list[Row] = []
    for label in cfg.variants:
        t0 = time.perf_counter()
        v = Variant(label, cfg)
        first = _timed_steps(v, batches, 1)
        if cfg.build_steps > 1:
            _timed_steps(v, batches, cfg.build_steps - 1)
        slow = first > cfg.slow_s  # the same on every rank: it is a max over ranks
        ef = v.state.error_feedback if v.state is not None else None
        v.built = v.state.stats() if v.state is not None else None
        variants.append(v)
        rows.append(Row(label, ef, 1 if slow else cfg.steps, first_step_s=first, slow=slow))
        _log(rank, f"built {label}: first step {first:.3f} s ({time.perf_counter() - t0:.1f} s)")
    for rep in range(cfg.reps):
        t0 = time.perf_counter()
        for v, row in zip(variants, rows):
            if cfg.warmup and not row.slow:
                _timed_steps(v, batches, cfg.warmup)
            row.step_s.append(_timed_steps(v, batches, row.steps))
        _log(rank, f"rep {rep + 1}/{cfg.reps}: {time.perf_counter() - t0:.1f} s")
    n = n_params(cfg.widths)
    for v, row in zip(variants, rows):
        if v.state is None:
            row.wire_bytes_per_step = (2.0 if v.label == TORCH_FP16 else 4.0) * n
            row.ratio = 4.0 / (2.0 if v.label == TORCH_FP16 else 4.0)
            continue
        s, b = v.state.stats(), v.built or CommStats()
        steps = max(s.steps - b.steps, 1)  # codec and comm times over the reps' steps only
        codec = 1e3 * (s.compress_s + s.decompress_s - b.compress_s - b.decompress_s) / steps
        comm = 1e3 * (s.comm_s - b.comm_s) / steps
        wire, ratio, codec, comm = _mean_over_ranks([s.last_wire_bytes, s.ratio, codec, comm])
        row.wire_bytes_per_step, row.ratio, row.codec_ms, row.comm_ms = wire, ratio, codec, comm
    return rows


def summarize(rows: list[Row]) -> list[Row]:
    """Fill in min / median / max and the medians' ratios to the two baselines."""
    for r in rows:
        r.min_s, r.median_s, r.max_s = min(r.step_s), statistics.median(r.step_s), max(r.step_s)
    base = {r.label: r.median_s for r in rows}
    for r in rows:
        if ALLREDUCE in base:
            r.vs_allreduce = r.median_s / base[ALLREDUCE]
        if TORCH_FP16 in base:
            r.vs_torch_fp16 = r.median_s / base[TORCH_FP16]
    return rows


def worker(rank: int, tmp: str, cfg: Config) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), WORLD)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
    )
    try:
        rows = measure(rank, cfg)
        # DDP models sit in reference cycles (model -> hook -> state); free them now, while
        # the process group lives: freed at exit instead, gloo can abort the process.
        gc.collect()
        if rank == 0:
            with open(os.path.join(tmp, "rows.json"), "w") as f:
                json.dump([asdict(r) for r in rows], f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(cfg: Config) -> list[Row]:
    """Spawn the two ranks and return rank 0's summarized rows."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(tmp, cfg), nprocs=WORLD, join=True)
        with open(os.path.join(tmp, "rows.json")) as f:
            return summarize([Row(**r) for r in json.load(f)])


def _opt(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(rows: list[Row], cfg: Config) -> str:
    """Markdown: step time, its ratio to the baselines, bytes per step and ratio per variant."""
    lines = [
        "| variant | EF | step ms (median) | min / max | vs allreduce | vs torch-fp16 "
        "| wire MB / step | ratio | codec ms | comm ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ef = "" if r.error_feedback is None else ("on" if r.error_feedback else "off")
        label = f"{r.label} ({r.steps} step/rep)" if r.slow else r.label
        lines.append(
            f"| {label} | {ef} | {1e3 * r.median_s:.1f} | {1e3 * r.min_s:.1f} / "
            f"{1e3 * r.max_s:.1f} | {_opt(r.vs_allreduce, '.2f')} | "
            f"{_opt(r.vs_torch_fp16, '.2f')} | {r.wire_bytes_per_step / 1e6:.3f} | "
            f"{r.ratio:.1f} | {_opt(r.codec_ms, '.1f')} | {_opt(r.comm_ms, '.1f')} |"
        )
    lines += [
        "",
        f"{WORLD} gloo ranks x 1 thread, MLP {'-'.join(map(str, cfg.widths))} "
        f"({n_params(cfg.widths):,} parameters), batch {cfg.batch}, SGD, "
        f"torch {torch.__version__}.",
        f"Reps: {cfg.reps}, interleaved, each of {cfg.warmup} warm-up + {cfg.steps} timed steps. "
        "Step time: slowest rank's.",
        "Wire MB (bytes handed to collectives), ratio, codec (compress + decompress) and comm ms: "
        "per step, mean over ranks.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="", help="';'-separated specs (default: every compressor)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per rep (5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per rep (1)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved reps (7)")
    ap.add_argument("--slow-s", type=float, default=3.0, help="first step slower: 1 step/rep")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--markdown", default="", help="also write the table here")
    ap.add_argument("--smoke", action="store_true", help="small model, 1 rep, 3 specs")
    args = ap.parse_args(argv)
    specs = [s for s in args.specs.split(";") if s]
    if args.smoke:
        base = Config(widths=(64, 128, 64), steps=2, warmup=0, build_steps=1, reps=1)
        specs = specs or SMOKE_SPECS
    else:
        base = Config()
        specs = specs or commhooks.available()
    cfg = replace(
        base,
        steps=base.steps if args.steps is None else args.steps,
        warmup=base.warmup if args.warmup is None else args.warmup,
        reps=base.reps if args.reps is None else args.reps,
        slow_s=args.slow_s,
        variants=(ALLREDUCE, TORCH_FP16, *specs),
    )
    t0 = time.perf_counter()
    rows = run(cfg)
    wall = time.perf_counter() - t0
    md = table(rows, cfg) + f"\nTotal wall time {wall:.0f} s."
    data = {
        "config": asdict(cfg), "n_params": n_params(cfg.widths), "world": WORLD,
        "torch": torch.__version__, "wall_s": wall, "rows": [asdict(r) for r in rows],
    }  # fmt: skip
    write(md, data, args.markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
