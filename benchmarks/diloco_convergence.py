"""Validation loss and bytes of DiLoCo rounds against DDP with dense AdamW, at equal tokens.

Usage: ``python benchmarks/diloco_convergence.py [--seeds 0,1,2] [--steps 300] [--world 2]
[--only 'ddp;dense@H=30'] [--out F.json] [--markdown F.md] [--plot F.png] [--smoke]``;
``--from-json A.json [B.json ...] [--markdown F.md] [--plot F.png]`` tabulates and plots
earlier ``--out`` files (of the same steps and replicas) without training.

The model, data, AdamW schedule and evaluation are those of
``benchmarks/transformer_convergence.py`` (a byte-level 2-layer transformer on Python's
standard library source, imported from there). Every rank is a replica that sees
``batch`` sequences a step, the same as a DDP rank, so every run trains on the same tokens.

Labels: ``ddp`` is DDP with dense AdamW; ``ddp:<spec>`` registers the per-step DDP hook
(``ddp:<spec>@updates=True`` compresses AdamW's updates instead, as in
transformer_convergence.py). ``<spec>@H=30,F=4,tau=2,lr=1.0,momentum=0.5`` trains with
:class:`commhooks.diloco.DiLoCo`: ``<spec>`` is the pseudo-gradients' compressor (``dense``:
none), ``H`` ``sync_every``, ``F`` ``fragments``, ``tau`` ``delay``, ``lr`` and ``momentum``
the outer Nesterov SGD's (momentum 0: plain SGD; absent: the package's defaults).

Columns: validation loss (min / median / max over seeds) and its median against DDP's, the
bytes each rank handed to collectives against DDP's (4 bytes per parameter per step), and
the most bytes one sync handed over (DDP: one step's gradient).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import torch
from _report import by_label, parse_variant, write
from torch import Tensor
from transformer_convergence import (
    Config,
    Result,
    TinyLM,
    batch_of,
    evaluate,
    lm_loss,
    lr_at,
    run,
    train_one,
)

import commhooks
from commhooks.diloco import OUTER_LR, OUTER_MOMENTUM, DiLoCo

#: the rounds and their baselines
LABELS = [
    "ddp", "ddp:uniform:bits=4", "ddp:topk:ratio=0.01@updates=True",
    "dense@H=10", "dense@H=30", "dense@H=100",
    "uniform:bits=8@H=30", "uniform:bits=4@H=30", "uniform:bits=4@H=100",
    "topk:ratio=0.02|uniform:bits=2@H=30", "topk:ratio=0.02|uniform:bits=2@H=100",
    "dense@H=30,F=4,tau=0", "dense@H=30,F=4,tau=2",
    "dense@H=30,lr=0.7,momentum=0.9", "dense@H=30,lr=1.0,momentum=0.0",
]  # fmt: skip

#: the label options DiLoCo itself takes; the others go to the engine
ROUND_OPTIONS = ("H", "F", "tau", "lr", "momentum")

SMOKE_LABELS = ["ddp", "uniform:bits=4@H=5", "dense@H=8,F=4,tau=1"]


def make_diloco(
    model: torch.nn.Module, opt: torch.optim.Optimizer, label: str, seed: int
) -> DiLoCo:
    """The :class:`DiLoCo` of a rounds label (``<spec>@H=30,F=4,tau=2,lr=1.0,momentum=0.5``;
    other options are the engine's, ``feedback.<field>`` the error feedback's)."""
    spec, opts = parse_variant(label)
    outer = None
    if "lr" in opts or "momentum" in opts:
        momentum = float(opts.get("momentum", OUTER_MOMENTUM))  # type: ignore[arg-type]
        outer = functools.partial(
            torch.optim.SGD, lr=float(opts.get("lr", OUTER_LR)),  # type: ignore[arg-type]
            momentum=momentum, nesterov=momentum > 0,
        )  # fmt: skip
    extra = {k: v for k, v in opts.items() if k not in ROUND_OPTIONS and "." not in k}
    ef = {k.split(".", 1)[1]: v for k, v in opts.items() if k.startswith("feedback.")}
    if ef:
        extra["feedback"] = commhooks.FeedbackConfig(**ef)  # type: ignore[arg-type]
    return DiLoCo(
        model, opt, sync_every=int(opts["H"]),  # type: ignore[call-overload]
        compressor=None if spec == "dense" else spec, outer_optimizer=outer,
        fragments=int(opts.get("F", 1)), delay=int(opts.get("tau", 0)),  # type: ignore[call-overload]
        seed=seed, **extra,
    )  # fmt: skip


def train_rounds(
    rank: int, world: int, text: tuple[Tensor, Tensor], label: str, seed: int, cfg: Config
) -> Result:
    """One run of ``label`` on this rank: DDP through transformer_convergence's trainer, or
    DiLoCo over AdamW."""
    if label == "ddp" or label.startswith("ddp:"):
        spec = label[4:] or "dense"
        return replace(train_one(rank, world, text, spec, seed, cfg), label=label)
    train, val = text
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diloco = make_diloco(model, opt, label, seed)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    curve = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        starts = torch.randint(len(train) - cfg.context - 1, (cfg.batch,), generator=g)
        opt.zero_grad()
        lm_loss(model, *batch_of(train, starts, cfg.context)).backward()
        opt.step()
        diloco.step()
        if rank == 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            curve.append((step + 1, evaluate(model, val, cfg)))
    seconds = time.perf_counter() - t0
    stats = diloco.stats()
    ddp_bytes = 4 * sum(p.numel() for p in model.parameters()) * cfg.steps
    val_loss = curve[-1][1] if curve else float("nan")
    extra = {"peak_sync_bytes": float(stats.peak_wire_bytes), "syncs": float(stats.syncs)}
    return Result(label, seed, val_loss, curve, ddp_bytes, stats.wire_bytes, seconds, extra)


def table(results: list[Result], params: int) -> str:
    """Markdown: loss over seeds, the median against DDP's, bytes and peak bytes per sync
    against DDP's."""
    by = by_label(results)
    ddp = statistics.median(r.val_loss for r in by["ddp"]) if "ddp" in by else None
    lines = [
        "| run | val loss min / median / max | vs DDP (median) | bytes fewer than DDP "
        "| peak bytes per sync (vs DDP) | s per run |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in by.items():
        losses = sorted(r.val_loss for r in rows)
        med = statistics.median(losses)
        vs = f"{med / ddp:.3f}x" if ddp else "n/a"
        fewer = sum(r.raw_bytes for r in rows) / max(1, sum(r.wire_bytes for r in rows))
        peak = max(r.probes.get("peak_sync_bytes", 4.0 * params) for r in rows)
        secs = statistics.median(r.seconds for r in rows)
        cell = label.replace("|", "\\|")  # a pipeline's "|" would end the cell
        lines.append(
            f"| {cell} | {losses[0]:.4f} / {med:.4f} / {losses[-1]:.4f} | {vs} | "
            f"{fewer:,.0f}x | {peak / 1e3:,.1f} kB ({peak / (4 * params):.2f}x) | {secs:.0f} |"
        )
    return "\n".join(lines)


def plot(data: dict[str, Any], path: str) -> None:
    """Validation loss (median over seeds) against bytes fewer than DDP (log scale): per-step
    runs (DDP and ``ddp:<spec>``) and rounds as two series on one chart, each point labelled
    (``all`` for ``compress_1d=True,min_numel=0``); DDP's median loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    by = by_label([Result(**r) for r in data["results"]])
    ddp = statistics.median(r.val_loss for r in by["ddp"]) if "ddp" in by else None
    fig, ax = plt.subplots(figsize=(11, 6))
    right = 1.0
    for name, marker, keep in (
        ("per step (DDP, hook, compress_updates)", "s", lambda k: k == "ddp" or k[:4] == "ddp:"),
        ("rounds (DiLoCo)", "o", lambda k: not (k == "ddp" or k[:4] == "ddp:")),
    ):
        points = []
        for label, rows in by.items():
            if keep(label):
                fewer = sum(r.raw_bytes for r in rows) / max(1, sum(r.wire_bytes for r in rows))
                points.append((fewer, statistics.median(r.val_loss for r in rows), label))
        points.sort()
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker, label=name, ms=7)
        for x, y, label in points:
            short = label.replace("compress_1d=True,min_numel=0", "all").replace("feedback.", "")
            ax.annotate(short, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        right = max(right, points[-1][0])
    if ddp is not None:
        ax.axhline(ddp, color="k", lw=0.8, ls="--", label="DDP's loss")
        ax.axhline(1.03 * ddp, color="grey", lw=0.6, ls=":", label="DDP's loss + 3%")
    ax.set_xscale("log")
    ax.set_xlim(0.7, right * 12)  # room for the labels of the rightmost points
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))  # 1x, 10x, not 10^1
    ax.set_xlabel("bytes fewer than DDP (log scale)")
    ax.set_ylabel("validation loss (median over seeds)")
    cfg = data["config"]
    seeds = sorted({r["seed"] for r in data["results"]})
    ax.set_title(
        f"{data['world']} ranks, {cfg['steps']} AdamW steps each, equal tokens; seeds {seeds}"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merged(paths: list[str]) -> dict[str, Any]:
    """The results of several ``--out`` files of one configuration (steps, replicas) as one,
    each label's seeds gathered over the files (a label and seed found twice keeps the first
    file's run)."""
    data: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if not data:
            data = {**part, "results": []}
        elif (part["config"], part["world"]) != (data["config"], data["world"]):
            raise ValueError(f"from_json: {path} ran another configuration than {paths[0]}")
        seen = {(r["label"], r["seed"]) for r in data["results"]}
        data["results"] += [r for r in part["results"] if (r["label"], r["seed"]) not in seen]
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--world", type=int, default=2, help="replicas (= DDP ranks)")
    ap.add_argument("--only", default="", help="labels to run, separated by ';'")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--markdown", default="", help="also write the table here")
    ap.add_argument("--plot", default="", help="also plot loss against bytes here (PNG)")
    ap.add_argument(
        "--from-json",
        nargs="+",
        default=[],
        help="tabulate and plot these --out files (their runs of --seeds and --only, merged "
        "into --out); no run",
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny run (tests)")
    args = ap.parse_args(argv)
    if args.from_json:
        data = merged(args.from_json)
        keep = {int(s) for s in args.seeds.split(",")}
        wanted = set(args.only.split(";")) if args.only else None
        data["results"] = [
            r for r in data["results"]
            if r["seed"] in keep and (wanted is None or r["label"] in wanted)
        ]  # fmt: skip
        md = table([Result(**r) for r in data["results"]], data["params"])
        write(md, data, markdown_path=args.markdown, json_path=args.out)
        if args.plot:
            plot(data, args.plot)
        return 0
    labels = args.only.split(";") if args.only else (SMOKE_LABELS if args.smoke else LABELS)
    seeds = [int(s) for s in args.seeds.split(",")] if not args.smoke else [0]
    cfg = Config(steps=args.steps)
    if args.smoke:
        cfg = Config(steps=16, warmup=4, eval_every=8, eval_batches=2, text_bytes=200_000)
    t0 = time.perf_counter()
    results = run(labels, seeds, cfg, world=args.world, train=train_rounds)
    params = sum(p.numel() for p in TinyLM(cfg).parameters())
    md = table(results, params) + (
        f"\n\n{args.world} replicas, {cfg.steps} AdamW steps each, seeds {seeds}; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    data: dict[str, Any] = {"config": asdict(cfg), "world": args.world, "params": params}
    data["results"] = [asdict(r) for r in results]
    write(md, data, markdown_path=args.markdown, json_path=args.out)
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
