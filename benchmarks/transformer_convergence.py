"""Validation loss of a byte-level transformer LM trained with AdamW under DDP, every
compressor against dense.

Usage: ``python benchmarks/transformer_convergence.py [--seeds 0,1,2] [--steps 300]
[--only 'dense;sign'] [--probe-every 25] [--out F.json]``.

The text is the source of ten modules of the running Python's standard library (no
download), read as bytes: the first 90% trains, the rest validates. Each of 2 gloo ranks
trains a 2-layer pre-norm transformer (d=64, 4 heads, context 64, ~137k parameters) with
AdamW and a linear-warm-up cosine schedule, on its own seeded batches; the hook is registered
with :func:`commhooks.ddp.register` (labels ``spec@option=value`` pass hook options;
``spec@updates=True`` compresses AdamW's updates through :func:`commhooks.ddp.compress_updates`
instead; ``feedback.warmup_steps=50`` and other ``feedback.`` fields build a
:class:`commhooks.FeedbackConfig`). Rank 0
evaluates the validation loss every ``eval_every`` steps. ``--probe-every K`` also measures,
every K steps, how far the averaged gradient is from the dense average at the same point and
how large AdamW's steps and second moments are (see ``docs/convergence.md``).
``tests/benchmarks/test_transformer_convergence.py`` runs a tiny version.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import by_label, parse_variant, write
from torch import Tensor, nn

import commhooks
import commhooks.ddp

MODULES = (
    "argparse.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py",
    "subprocess.py", "tarfile.py", "functools.py", "enum.py", "ast.py",
)  # fmt: skip

#: dense and every compressor at its defaults, plus the issue's rank-4 PowerSGD and 4-bit ints
LABELS = [
    "dense", "powersgd:rank=4", "uniform:bits=8", "uniform:bits=4", "sign", "ternary",
    "topk:ratio=0.01", "powersgd", "qsgd", "randomk", "dgc", "threshold", "nonuniform",
    "adaptive", "fp16", "bf16",
]  # fmt: skip


@dataclass(frozen=True)
class Config:
    """Model, data and schedule; the defaults are the full benchmark."""

    steps: int = 300
    batch: int = 16  # sequences per rank and step
    context: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 20  # linear learning-rate warm-up steps before the cosine decay
    weight_decay: float = 0.01
    eval_every: int = 25
    eval_batches: int = 8  # of 32 sequences each
    probe_every: int = 0  # 0: no gradient probes
    text_bytes: int = 0  # 0: all of MODULES


@dataclass
class Result:
    label: str
    seed: int
    val_loss: float
    curve: list[tuple[int, float]]
    raw_bytes: int
    wire_bytes: int
    seconds: float
    probes: dict[str, float] = field(default_factory=dict)


def load_text(limit: int = 0) -> Tensor:
    """The bytes of :data:`MODULES` from this Python's standard library, as int64 tokens."""
    root = os.path.dirname(os.__file__)
    data = b"".join(pathlib.Path(root, m).read_bytes() for m in MODULES)
    data = data[:limit] if limit else data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class TinyLM(nn.Module):
    """A byte-level causal transformer: embeddings, pre-norm encoder layers, a linear head."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(cfg.context))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def batch_of(text: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(context + 1)
    seq = text[idx]
    return seq[:, :-1], seq[:, 1:]


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def lr_at(cfg: Config, step: int) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to 10% of it at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model: nn.Module, val: Tensor, cfg: Config) -> float:
    g = torch.Generator().manual_seed(1234)  # the same validation windows for every run
    losses = []
    for _ in range(cfg.eval_batches):
        starts = torch.randint(len(val) - cfg.context - 1, (32,), generator=g)
        losses.append(float(lm_loss(model, *batch_of(val, starts, cfg.context))))
    return statistics.mean(losses)


def probe(
    model: nn.Module, x: Tensor, y: Tensor, world: int
) -> tuple[dict[str, float], list[Tensor]]:
    """The hook's averaged gradients (in ``.grad``) against the dense average at the same
    parameters: relative error, cosine and the component along the dense average, over the
    matrices the hook compresses (2-D tensors of >= 1024 elements) and over the rest. Leaves
    ``.grad`` as the hook made it."""
    params = [p for p in model.parameters()]
    hooked = [p.grad.detach().clone() for p in params]
    model.zero_grad()
    lm_loss(model, x, y).backward()
    dense = [p.grad.detach().clone() for p in params]
    flat = torch.cat([d.reshape(-1) for d in dense])
    dist.all_reduce(flat)
    dense = [
        d.view_as(p) for d, p in zip(flat.div_(world).split([p.numel() for p in params]), params)
    ]
    for p, h in zip(params, hooked):
        p.grad.copy_(h)
    out: dict[str, float] = {}
    big = [p.dim() >= 2 and p.numel() >= 1024 for p in params]
    for name, keep in (("big", True), ("small", False)):
        h = torch.cat([t.reshape(-1) for t, b in zip(hooked, big) if b == keep])
        d = torch.cat([t.reshape(-1) for t, b in zip(dense, big) if b == keep])
        out[f"rel_err_{name}"] = float((h - d).norm() / d.norm().clamp_min(1e-12))
        out[f"cos_{name}"] = float(nn.functional.cosine_similarity(h, d, dim=0))
        # the hooked gradient's component along the dense one (1: unbiased in that direction)
        out[f"along_{name}"] = float(h.dot(d) / d.dot(d).clamp_min(1e-24))
    return out, [p for p, b in zip(params, big) if b]


def adam_stats(
    opt: torch.optim.Optimizer, big: list[Tensor], before: list[Tensor], lr: float
) -> dict[str, float]:
    """AdamW's step on the compressed matrices: RMS of the update over the learning rate
    (weight decay left out), RMS of sqrt(v) (second moment), and the share of elements that
    did not move by 1% of the learning rate."""
    wd = opt.param_groups[0]["weight_decay"]
    upd = torch.cat([((p.detach() - b) / lr + wd * b).reshape(-1) for p, b in zip(big, before)])
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in big])
    return {
        "update_rms": float(upd.pow(2).mean().sqrt()),
        "sqrt_v_rms": float(v.mean().sqrt()),
        "frozen_share": float((upd.abs() < 0.01).float().mean()),
    }


def train_one(
    rank: int, world: int, text: tuple[Tensor, Tensor], label: str, seed: int, cfg: Config
) -> Result:
    train, val = text
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    ddp = nn.parallel.DistributedDataParallel(model)
    spec, options = parse_variant(label)
    # ``feedback.<field>=v`` options build the error-feedback config (DGC warm-up, decay)
    ef = {k.split(".", 1)[1]: options.pop(k) for k in list(options) if k.startswith("feedback.")}
    if ef:
        options["feedback"] = commhooks.FeedbackConfig(**ef)
    opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stats_of = None
    if options.pop("updates", False):  # compress AdamW's updates instead of the gradients
        stats_of = commhooks.ddp.compress_updates(ddp, opt, spec, seed=seed, **options).stats
    elif spec != "dense":
        stats_of = commhooks.ddp.register(ddp, spec, seed=seed, **options).stats
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    curve, sums, count = [], {}, 0
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch_of(
            train,
            torch.randint(len(train) - cfg.context - 1, (cfg.batch,), generator=g),
            cfg.context,
        )
        opt.zero_grad()
        lm_loss(ddp, x, y).backward()
        probing = cfg.probe_every and step % cfg.probe_every == cfg.probe_every - 1
        if probing:
            found, big = probe(model, x, y, world)
            before = [p.detach().clone() for p in big]
        opt.step()
        if probing:
            found.update(adam_stats(opt, big, before, lr))
            for k, v in found.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        if rank == 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            curve.append((step + 1, evaluate(model, val, cfg)))
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    raw = wire = 4 * n * cfg.steps
    if stats_of is not None:
        stats = stats_of()
        raw, wire = stats.raw_bytes, stats.wire_bytes
    val_loss = curve[-1][1] if curve else float("nan")
    probes = {k: v / count for k, v in sums.items()}
    return Result(label, seed, val_loss, curve, raw, wire, seconds, probes)


def worker(
    rank: int,
    world: int,
    tmp: str,
    cfg: Config,
    labels: list[str],
    seeds: list[int],
    train: Callable[..., Any] = train_one,
) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        tokens = load_text(cfg.text_bytes)
        cut = int(len(tokens) * 0.9)
        text = (tokens[:cut], tokens[cut:])
        results = []
        for label in labels:
            for seed in seeds:
                results.append(train(rank, world, text, label, seed, cfg))
                if rank == 0:
                    r = results[-1]
                    print(
                        f"{r.label} seed {r.seed}: val {r.val_loss:.4f} ({r.seconds:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        if rank == 0:
            with open(os.path.join(tmp, "results.json"), "w") as f:
                json.dump([asdict(r) for r in results], f)
        dist.barrier()  # ranks leave together: one tearing gloo down mid-send aborts the other
    finally:
        gc.collect()
        dist.destroy_process_group()


def run(
    labels: list[str],
    seeds: list[int],
    cfg: Config,
    world: int = 2,
    train: Callable[..., Any] = train_one,
    record: type[Any] = Result,
) -> list[Any]:
    """Spawn ``world`` gloo ranks, train every label for every seed with ``train`` (a
    module-level function, or a ``functools.partial`` of one, with :func:`train_one`'s
    arguments, returning a dataclass with ``label``, ``seed``, ``val_loss`` and ``seconds``),
    return rank 0's results as ``record``s (``train``'s dataclass)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tmp, cfg, labels, seeds, train), nprocs=world, join=True)
        with open(os.path.join(tmp, "results.json")) as f:
            return [record(**r) for r in json.load(f)]


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose validation loss is at most ``target``."""
    return next((s for s, loss in curve if loss <= target), None)


def table(results: list[Result]) -> str:
    """Markdown: validation loss min / median / max over seeds, gap to dense's median, steps
    to reach the same seed's dense final loss, and raw / wire bytes."""
    by = by_label(results)
    dense = {r.seed: r.val_loss for r in by.get("dense", [])}
    ref = statistics.median(dense.values()) if dense else None
    lines = [
        "| run | val loss min / median / max | vs dense (median) | steps to dense's loss "
        "| bytes vs dense |",
        "|---|---|---|---|---|",
    ]
    for label, rows in by.items():
        losses = sorted(r.val_loss for r in rows)
        med = statistics.median(losses)
        gap = f"{100 * (med / ref - 1):+.2f}%" if ref else "n/a"
        reach = [steps_to(r.curve, dense[r.seed]) if r.seed in dense else None for r in rows]
        reached = ", ".join("—" if s is None else str(s) for s in reach)
        ratio = sum(r.raw_bytes for r in rows) / max(1, sum(r.wire_bytes for r in rows))
        lines.append(
            f"| {label} | {losses[0]:.4f} / {med:.4f} / {losses[-1]:.4f} | {gap} | {reached} "
            f"| {ratio:.1f}x fewer |"
        )
    return "\n".join(lines)


def probe_table(results: list[Result]) -> str:
    """Markdown: the probes' means per run (median over seeds)."""
    by = {k: v for k, v in by_label(results).items() if v[0].probes}
    if not by:
        return ""
    keys = list(next(iter(by.values()))[0].probes)
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, rows in by.items():
        cells = [f"{statistics.median(r.probes[k] for r in rows):.3g}" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--probe-every", type=int, default=0)
    ap.add_argument("--only", default="", help="labels to run, separated by ';' (spec@opt=v)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    labels = args.only.split(";") if args.only else LABELS
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = Config(steps=args.steps, probe_every=args.probe_every)
    t0 = time.perf_counter()
    results = run(labels, seeds, cfg)
    md = (
        table(results)
        + f"\n\n2 ranks, {cfg.steps} steps, seeds {seeds}; {time.perf_counter() - t0:.0f} s"
    )
    if args.probe_every:
        md += "\n\n" + probe_table(results)
    write(md, [asdict(r) for r in results], json_path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
