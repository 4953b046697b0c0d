"""Time over a shaped link: DiLoCo rounds against DDP, per-step compression and no
communication at all, training diloco_convergence.py's transformer to DDP's final loss.

Usage: ``.venv/bin/python benchmarks/diloco_link.py [--rates 10mbit 100mbit] [--steps 300]
[--horizon 2] [--reps 2] [--only 'ddp;noop;dense@H=30'] [--out F.json] [--markdown F.md]
[--smoke]`` (root: it creates network namespaces).

Two ranks run in network namespaces on links shaped to each rate
(:class:`commhooks.launch.ShapedCluster`), one gloo rank of one thread each; ``--rates
unshaped`` runs them over the namespaces' unshaped veth pair. Each rep trains every row in
turn (seed 0), so the machine's noise spreads over the rows alike:

- ``ddp`` (DDP, dense AdamW) trains ``--steps`` steps; its final validation loss is the
  target of the rows after it (without ``ddp``, ``--target`` gives it: more reps of the
  cheap rows against a DDP run measured before).
- The other rows train on an AdamW schedule ``--horizon`` times as long and stop at the
  first evaluation at or below that target: ``noop`` (every rank trains alone and nothing is
  exchanged: the ceiling of throughput), ``ddp:<spec>`` (the per-step DDP hook;
  ``ddp:<spec>@updates=True`` compresses AdamW's updates instead), and DiLoCo rows labelled
  as in diloco_convergence.py (``uniform:bits=4@H=30``, ``dense@H=30,F=4,tau=2``).

Rank 0 evaluates every ``eval_every`` steps with the clocks stopped (an exchange in flight
goes on meanwhile). Reported per rate and row, min / median / max over reps: seconds of
training until the target was reached (``—``: not within the horizon), that time against
DDP's in the same rep, the steps taken, the throughput (tokens/s over both ranks) and a
step's time against ``noop``'s in the same rep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.distributed as dist
from _report import parse_variant, spread, write
from _shaped import run_pair
from diloco_convergence import make_diloco
from torch import Tensor, nn
from transformer_convergence import Config, TinyLM, batch_of, evaluate, lm_loss, load_text, lr_at

import commhooks.ddp

DDP, NOOP = "ddp", "noop"
LABELS = [
    DDP, NOOP, "ddp:uniform:bits=4", "ddp:topk:ratio=0.01@updates=True",
    "dense@H=30", "uniform:bits=4@H=30", "dense@H=30,F=4,tau=2",
]  # fmt: skip
SMOKE_LABELS = [DDP, NOOP, "ddp:uniform:bits=4", "uniform:bits=4@H=4,F=2,tau=1"]
SMOKE_CONFIG = Config(steps=16, warmup=4, eval_every=8, eval_batches=2, text_bytes=200_000)
SEED = 0

_Built = tuple[nn.Module, torch.optim.Optimizer, Any, Any]


def build(label: str, model: nn.Module, cfg: Config) -> _Built:
    """The module to train, its AdamW, a call after each optimizer step, and a call that
    returns the bytes this rank handed to collectives (waiting for exchanges in flight)."""
    n = sum(p.numel() for p in model.parameters())
    if label in (NOOP, DDP) or label.startswith("ddp:"):
        net = model if label == NOOP else nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        spec, options = parse_variant(label[4:])
        stats = None
        if options.pop("updates", False):
            stats = commhooks.ddp.compress_updates(net, opt, spec, seed=SEED, **options).stats
        elif label.startswith("ddp:"):
            stats = commhooks.ddp.register(net, spec, seed=SEED, **options).stats
        per_step = 0 if label == NOOP else 4 * n  # DDP's own all-reduce: dense fp32

        def wire(steps: int) -> int:
            return stats().wire_bytes if stats is not None else per_step * steps

        return net, opt, lambda: None, wire
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diloco = make_diloco(model, opt, label, SEED)
    return model, opt, diloco.step, lambda steps: diloco.stats().wire_bytes


def train_to(
    rank: int, text: tuple[Tensor, Tensor], label: str, cfg: Config, target: float | None,
    ctrl: dist.ProcessGroup,
) -> dict[str, Any]:  # fmt: skip
    """Train ``label`` for ``cfg.steps`` steps, stopping at the first evaluation at or below
    ``target`` (rank 0's; None: never). Returns its row (rank 0's loss, the slower rank's
    seconds of training)."""
    train, val = text
    torch.manual_seed(SEED)
    model = TinyLM(cfg)
    net, opt, after, wire = build(label, model, cfg)
    g = torch.Generator().manual_seed(SEED * 1000 + rank)
    curve: list[tuple[int, float]] = []
    busy, reached, done = 0.0, None, 0
    dist.barrier(group=ctrl)
    t = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        starts = torch.randint(len(train) - cfg.context - 1, (cfg.batch,), generator=g)
        opt.zero_grad()
        lm_loss(net, *batch_of(train, starts, cfg.context)).backward()
        opt.step()
        after()
        done = step + 1
        if done % cfg.eval_every and done != cfg.steps:
            continue
        busy += time.perf_counter() - t
        stop = torch.zeros(1)
        if rank == 0:
            curve.append((done, evaluate(model, val, cfg)))
            stop[0] = float(target is not None and curve[-1][1] <= target)
        # on a group of its own: DiLoCo's exchange may be in flight on the default one
        dist.broadcast(stop, 0, group=ctrl)
        if stop.item():
            reached = done
            break
        t = time.perf_counter()
    sent = wire(done)
    took = torch.tensor([busy])
    dist.all_reduce(took, op=dist.ReduceOp.MAX, group=ctrl)
    return {
        "label": label, "steps": done, "reached": reached, "seconds": float(took),
        "val_loss": curve[-1][1] if curve else float("nan"), "curve": curve,
        "wire_bytes": sent, "tokens": done * cfg.batch * cfg.context * dist.get_world_size(),
    }  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): every rep trains every row in turn."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ctrl = dist.new_group(backend="gloo")
    rank = dist.get_rank()
    cfg = _config(args)
    tokens = load_text(cfg.text_bytes)
    cut = int(len(tokens) * 0.9)
    text = (tokens[:cut], tokens[cut:])
    longer = replace(cfg, steps=int(cfg.steps * args.horizon))
    rows = []
    for rep in range(args.reps):
        target = args.target
        for label in args.only:
            row = train_to(rank, text, label, cfg if label == DDP else longer, target, ctrl)
            target = row["val_loss"] if label == DDP else target
            rows.append({**row, "rep": rep})
            if rank == 0:
                print(f"{label} rep {rep}: {row['steps']} steps, {row['seconds']:.1f} s, "
                      f"val {row['val_loss']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label, over reps: seconds to the target and against DDP's, steps, tokens/s, and
    the step time against noop's (each ratio taken within a rep)."""
    by_rep: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_rep.setdefault(r["rep"], {})[r["label"]] = r
    out: dict[str, Any] = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [reps[label] for reps in by_rep.values()]
        hit = [r for r in mine if r["reached"] is not None or r["label"] == DDP]
        s: dict[str, Any] = {
            "steps": [r["steps"] for r in mine],
            "val_loss": [r["val_loss"] for r in mine],
            "wire_bytes": mine[0]["wire_bytes"],
            "tokens_per_s": spread([r["tokens"] / r["seconds"] for r in mine]),
            "reached": len(hit),
        }
        if hit:
            s["seconds"] = spread([r["seconds"] for r in hit])
        ratios = {k: [] for k in (DDP, NOOP)}  # type: dict[str, list[float]]
        for reps in by_rep.values():
            r = reps[label]
            if DDP in reps and (r["reached"] is not None or label == DDP):
                ratios[DDP].append(r["seconds"] / reps[DDP]["seconds"])
            if NOOP in reps:
                noop = reps[NOOP]
                ratios[NOOP].append((r["seconds"] / r["steps"]) / (noop["seconds"] / noop["steps"]))
        s["vs_ddp_time"] = spread(ratios[DDP]) if ratios[DDP] else None
        s["step_vs_noop"] = spread(ratios[NOOP]) if ratios[NOOP] else None
        out[label] = s
    return out


def _cells(s: dict[str, float] | None, fmt: str) -> str:
    if s is None:
        return "—"
    return " / ".join(format(s[k], fmt) for k in ("min", "median", "max"))


def markdown(report: dict[str, Any]) -> str:
    """One row per rate and label."""
    lines = [
        "| link | run | s to DDP's loss | vs DDP's time | steps | tokens/s "
        "| step vs noop | reached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate, rows in report["rates"].items():
        for label, s in rows.items():
            steps = "/".join(str(x) for x in sorted(set(s["steps"])))
            reached = f"{s['reached']}/{len(s['steps'])}"
            cell = label.replace("|", "\\|")
            lines.append(
                f"| {rate} | {cell} | {_cells(s.get('seconds'), '.1f')} "
                f"| {_cells(s['vs_ddp_time'], '.3f')} | {steps} "
                f"| {_cells(s['tokens_per_s'], ',.0f')} | {_cells(s['step_vs_noop'], '.2f')} "
                f"| {reached} |"
            )
    return "\n".join(lines)


def run_rate(args: argparse.Namespace, rate: str, script: list[str]) -> list[dict[str, Any]]:
    """Both ranks on links shaped to ``rate``; rank 0's rows."""
    return run_pair(script, rate, args.tmp, args.timeout_s)


def _config(args: argparse.Namespace) -> Config:
    return SMOKE_CONFIG if args.smoke else Config(steps=args.steps)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", default=["10mbit", "100mbit"])
    ap.add_argument("--steps", type=int, default=Config.steps, help="DDP's steps")
    ap.add_argument("--horizon", type=float, default=2.0, help="the others' steps / DDP's")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="labels to run, separated by ';' (ddp first)")
    ap.add_argument(
        "--target", type=float, default=None, help="the loss to reach, where ddp is not run"
    )
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 rep, unshaped")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--markdown", default=None, help="Markdown table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.rates, args.reps = ["unshaped"], 1
    args.only = args.only.split(";") if args.only else (SMOKE_LABELS if args.smoke else LABELS)
    if DDP in args.only and args.only[0] != DDP:
        raise ValueError(f"only={';'.join(args.only)!r}: 'ddp' sets the target, so it runs first")
    if args.target is not None and DDP in args.only:
        raise ValueError("target: ddp's final loss is the target where ddp runs; leave one out")
    if args.horizon < 1:
        raise ValueError(f"horizon={args.horizon}: must be at least 1")
    if args.worker:
        worker(args)
        return 0
    script = [
        os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
        "--horizon", str(args.horizon), "--reps", str(args.reps), "--only", ";".join(args.only),
        *(["--smoke"] if args.smoke else []),
        *(["--target", str(args.target)] if args.target is not None else []),
    ]  # fmt: skip
    report: dict[str, Any] = {"config": asdict(_config(args)), "args": vars(args), "rates": {}}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for rate in args.rates:
            raw[rate] = run_rate(args, rate, script)
            report["rates"][rate] = summarize(raw[rate])
    del report["args"]["tmp"]
    report["runs"] = raw
    write(markdown(report), report, args.markdown or "", args.out or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
