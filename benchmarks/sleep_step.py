"""DDP step time when backward leaves the host idle, as a GPU's backward does.

Usage: ``.venv/bin/python benchmarks/sleep_step.py [--rates 1gbit 100mbit] [--layers 8]
[--width 1024] [--sleep-ms 25] [--steps 4] [--reps 5] [--specs "powersgd:rank=1;topk:ratio=0.01"]
[--out F.json] [--markdown F.md] [--smoke]``

On this machine two ranks share two cores, so codec work competes with backward and an
unshaped CPU step cannot show what overlapping the exchange with backward buys. Here each of
``--layers`` linear layers (``--width`` squared) is followed by an autograd function whose
backward sleeps ``--sleep-ms``: the host is idle while "the device" computes, and the
communication worker has it to itself. Two ranks run in network namespaces on links shaped
to each rate (root; :class:`commhooks.launch.ShapedCluster`); ``--rates unshaped`` runs them
over the namespaces' unshaped veth pair.

Variants: ``noop`` (torch's ``noop_hook``: no communication at all), ``meet`` (a hook that
all-reduces one float per bucket and leaves the bucket as it is: what any hook that
communicates pays for making the ranks meet at every bucket, the floor for a compressor),
``dense`` (DDP's own all-reduce), and commhooks' hook for each spec. Each rep runs every
variant in turn (``--steps`` timed steps after one untimed one, after a barrier; the slower
rank's time), so machine noise spreads over all variants alike. Reported per variant and
rate: step time min / median / max over reps, the ratio of the variant's step to ``noop``'s
in the same rep (min / median / max) and to ``meet``'s (median), and the CPU time rank 0's
training thread spends per step (median over reps): forward, the backward's own arithmetic,
DDP's bucket copies and the optimizer, all of which a GPU would take off the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from _report import spread, write
from _shaped import run_pair
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks

NOOP, MEET, DENSE = "noop", "meet", "dense"
SPECS = ["powersgd:rank=1", "topk:ratio=0.01", "sign", "uniform:bits=8,shared_scale=true"]


class _Idle(torch.autograd.Function):
    """Identity forward; a backward that sleeps, leaving the host idle."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.seconds)
        return grad, None


class IdleMLP(nn.Module):
    """``layers`` linear layers of ``width`` squared, each backward followed by a sleep."""

    def __init__(self, layers: int, width: int, sleep_s: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.sleep_s = sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = _Idle.apply(torch.relu(layer(x)), self.sleep_s)
        return x


def _meet_hook(_, bucket):  # type: ignore[no-untyped-def]
    """All-reduce one float, then hand DDP its bucket unchanged: the ranks meet at every
    bucket, as any exchange makes them, and nothing else is sent or computed. (``bucket`` is
    not annotated: DDP accepts only the real ``dist.GradBucket`` class there, and this
    module's annotations are strings.)"""
    one = torch.zeros(1)
    work = dist.all_reduce(one, async_op=True)
    assert work is not None
    return work.get_future().then(lambda _: bucket.buffer())


def _model(args: argparse.Namespace, label: str) -> tuple[nn.Module, Any]:
    """The variant's DDP model and its commhooks state (None for the baselines)."""
    import commhooks.ddp

    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(
        IdleMLP(args.layers, args.width, args.sleep_ms / 1000), bucket_cap_mb=args.bucket_mb
    )
    state = None
    if label == NOOP:
        ddp.register_comm_hook(None, debugging_hooks.noop_hook)
    elif label == MEET:
        ddp.register_comm_hook(None, _meet_hook)
    elif label != DENSE:
        state = commhooks.ddp.register(ddp, label)
    return ddp, state


def _timed(
    ddp: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int
) -> tuple[float, float]:
    """Seconds per step, the slower rank's (one untimed step first); and this thread's CPU
    seconds per step."""
    for i in range(steps + 1):
        if i == 1:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    cpu = (time.thread_time() - c0) / steps
    took = torch.tensor([(time.perf_counter() - t0) / steps])
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took), cpu


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): every variant built once, then the interleaved reps."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    labels = [NOOP, MEET, DENSE, *args.specs]
    built = {label: _model(args, label) for label in labels}
    models = {k: m for k, (m, _) in built.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    x = torch.randn(
        args.batch, args.width, generator=torch.Generator().manual_seed(dist.get_rank())
    )
    for k in labels:
        _timed(models[k], opts[k], x, 1)  # builds buckets, process groups, warm-ups
    times: dict[str, list[float]] = {k: [] for k in labels}
    cpus: dict[str, list[float]] = {k: [] for k in labels}
    for _ in range(args.reps):
        for k in labels:
            took, cpu = _timed(models[k], opts[k], x, args.steps)
            times[k].append(took)
            cpus[k].append(cpu)
    if dist.get_rank() == 0:
        out = {}
        for k, (_, state) in built.items():
            wire = state.stats().last_wire_bytes if state is not None else None
            out[k] = {"times": times[k], "cpu": cpus[k], "wire_bytes": wire}
        with open(args.result, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def run_rate(args: argparse.Namespace, rate: str, script: list[str]) -> dict[str, Any]:
    """Both ranks at one link rate; the rows for that rate."""
    raw = run_pair(script, rate, args.tmp, args.timeout_s)
    noop, meet = raw[NOOP]["times"], raw[MEET]["times"]
    rows = {}
    for label, r in raw.items():
        rows[label] = {
            "step_ms": spread([t * 1000 for t in r["times"]]),
            "vs_noop": spread([t / n for t, n in zip(r["times"], noop)]),
            "vs_meet": spread([t / m for t, m in zip(r["times"], meet)]),
            "thread_cpu_ms": spread([c * 1000 for c in r["cpu"]]),
            "wire_bytes": r["wire_bytes"],
        }
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report as a table: one row per rate and variant."""
    lines = [
        "| link | variant | step ms (min / median / max) | vs noop (min / median / max) "
        "| vs meet (median) | training thread CPU ms |",
        "|---|---|---|---|---|---|",
    ]
    for rate, rows in report["rates"].items():
        for label, r in rows.items():
            s, v = r["step_ms"], r["vs_noop"]
            lines.append(
                f"| {rate} | {label} | {s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f} | "
                f"{v['min']:.2f} / {v['median']:.2f} / {v['max']:.2f} | "
                f"{r['vs_meet']['median']:.2f} | "
                f"{r['thread_cpu_ms']['median']:.0f} |"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sleep-ms", type=float, default=25.0)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--specs", default=";".join(SPECS), help="';'-separated compressor specs")
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 rep, unshaped")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--markdown", default=None, help="Markdown table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if isinstance(args.specs, str):
        args.specs = [s for s in args.specs.split(";") if s]
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.layers, args.width, args.sleep_ms, args.steps, args.reps = 2, 64, 2.0, 1, 1
        args.rates = ["unshaped"]
    import tempfile

    import commhooks

    for spec in args.specs:
        commhooks.compressor(spec)  # a bad spec fails here, before any process starts
    script = [
        os.path.abspath(__file__), "--worker", "--layers", str(args.layers),
        "--width", str(args.width), "--batch", str(args.batch),
        "--sleep-ms", str(args.sleep_ms), "--steps", str(args.steps), "--reps", str(args.reps),
        "--bucket-mb", str(args.bucket_mb),
        "--specs", ";".join(args.specs),
    ]  # fmt: skip
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "tmp"}}
    report["rates"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for rate in args.rates:
            report["rates"][rate] = run_rate(args, rate, script)
    write(markdown(report), report, args.markdown or "", args.out or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
