"""Compress + decompress time of every compressor against ``copy_`` of the same tensor.

Usage: ``python benchmarks/core_timing.py [--numel N] [--reps 5] [--specs "topk;uniform:bits=4"]``

Repetitions are interleaved (one of each compressor per round, with a copy_ beside each), so
machine noise hits all of them alike. Reported per compressor: the time of compress +
decompress, and eta = copy_ time / (compress + decompress time), min / median / max over rounds:
eta = 1 would be as fast as one memory copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import commhooks

DEFAULT_SPECS = [
    "topk:ratio=0.01",
    "topk:ratio=0.01,mode=exact",
    "randomk:ratio=0.01",
    "threshold:threshold=2.5",
    "dgc:ratio=0.01",
    "uniform:bits=8",
    "uniform:bits=4",
    "uniform:bits=4,entropy=true",
    "qsgd:levels=16",
    "nonuniform:bits=4",
    "ternary",
    "sign",
    "adaptive",
    "powersgd:rank=2",
    "fp16",
    "bf16",
    "topk:ratio=0.01|uniform:bits=8",
]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--specs", default=";".join(DEFAULT_SPECS), help="';'-separated specs")
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()
    specs = [s for s in args.specs.split(";") if s]
    x = torch.randn(args.numel)
    # PowerSGD needs a matrix; give every compressor the same 4096-column view.
    x2 = x.view(-1, 4096)
    dst = torch.empty_like(x)
    comps = {s: commhooks.compressor(s) for s in specs}
    for c in comps.values():  # warm-up: allocations, lazy state
        c.decompress(*c.compress(x2, "w"))
    eta: dict[str, list[float]] = {s: [] for s in specs}
    secs: dict[str, list[float]] = {s: [] for s in specs}
    for _ in range(args.reps):
        for s, c in comps.items():
            copy = _timed(lambda: dst.copy_(x))
            t = _timed(lambda c=c: c.decompress(*c.compress(x2, "w")))
            secs[s].append(t)
            eta[s].append(copy / t)
    rows = []
    print(f"numel={args.numel} fp32, {args.reps} interleaved rounds, torch {torch.__version__}")
    print(f"{'spec':36s} {'ms (median)':>12s} {'eta min':>8s} {'median':>8s} {'max':>8s}")
    for s in specs:
        e = eta[s]
        row = {
            "spec": s,
            "ms_median": 1e3 * statistics.median(secs[s]),
            "eta_min": min(e),
            "eta_median": statistics.median(e),
            "eta_max": max(e),
        }
        rows.append(row)
        print(
            f"{s:36s} {row['ms_median']:12.1f} {row['eta_min']:8.3f} "
            f"{row['eta_median']:8.3f} {row['eta_max']:8.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
