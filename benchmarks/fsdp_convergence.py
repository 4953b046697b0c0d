"""The transformer benchmark under FSDP2 (``fully_shard``): validation loss of compressed
exchanges against dense FSDP2 at equal steps, and, on 2 nodes x 2 ranks, inter-node bytes and
error-feedback memory per rank of the hierarchical mode against dense HSDP.

Usage: ``python benchmarks/fsdp_convergence.py [--seeds 0,1,2] [--steps 300]
[--only 'dense;uniform:bits=8'] [--nodes] [--out F.json]``.

Model, data, schedule and AdamW are those of ``benchmarks/transformer_convergence.py``; each
encoder layer and the root are ``fully_shard``-ed. Without ``--nodes``: 2 gloo ranks, one mesh
over both (the reduce-scatter mode of :func:`commhooks.fsdp.register`). With ``--nodes``: 4
ranks as 2 nodes x 2 ranks, each layer sharded over its node
(:func:`commhooks.fsdp.node_mesh`, the hierarchical mode); ``dense`` there is native HSDP (a
2-D mesh), and ``identity`` through the hook sends exactly what HSDP's dense all-reduce
between nodes sends, so its wire bytes are dense HSDP's inter-node bytes. Every rank
evaluates (FSDP2's forward is collective); rank 0 reports.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import transformer_convergence
from _report import by_label, parse_variant, write
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformer_convergence import Config, TinyLM, batch_of, evaluate, lm_loss, lr_at

import commhooks.fsdp

#: dense FSDP2 and the codecs the targets name
LABELS = ["dense", "uniform:bits=8", "uniform:bits=4", "bf16"]
NODE_LABELS = ["dense", "identity", "uniform:bits=8", "uniform:bits=4", "bf16"]


@dataclass
class Row:
    label: str
    seed: int
    val_loss: float
    raw_bytes: int
    wire_bytes: int
    link_bytes: float
    seconds: float
    feedback_bytes: int
    model_bytes: int
    ranks_per_node: int
    transport: str = ""


def shard(model: TinyLM, nodes: bool, dense: bool) -> None:
    """``fully_shard`` every encoder layer and the root: over every rank, over the node
    (hierarchical), or over a 2-D mesh (native HSDP, ``dense`` with ``nodes``)."""
    world = dist.get_world_size()
    if not nodes:
        mesh = init_device_mesh("cpu", (world,))
    elif dense:
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = commhooks.fsdp.node_mesh("cpu", ranks_per_node=2)
    for layer in model.blocks.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train_one(
    rank: int, world: int, text: tuple, label: str, seed: int, cfg: Config, nodes: bool = False
) -> Row:
    train, val = text
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    spec, options = parse_variant(label)
    shard(model, nodes, spec == "dense")
    state = None
    if spec != "dense":
        state = commhooks.fsdp.register(model, spec, seed=seed, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        starts = torch.randint(len(train) - cfg.context - 1, (cfg.batch,), generator=g)
        opt.zero_grad()
        lm_loss(model, *batch_of(train, starts, cfg.context)).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    val_loss = evaluate(model, val, cfg)
    raw = wire = feedback = 0
    link = 0.0
    transport = ""
    if state is not None:
        stats = state.stats()
        raw, wire, link = stats.raw_bytes, stats.wire_bytes, stats.link_bytes
        feedback = state.feedback_bytes()
        transport = state.engine.transport.name
    per_node = 2 if nodes else world
    return Row(
        label, seed, val_loss, raw, wire, link, seconds, feedback, model_bytes, per_node, transport
    )


def run(labels: list[str], seeds: list[int], cfg: Config, nodes: bool) -> list[Row]:
    """The transformer benchmark's ranks (2, or 4 as 2 nodes x 2) training with
    :func:`train_one`."""
    train = functools.partial(train_one, nodes=nodes)
    return transformer_convergence.run(
        labels, seeds, cfg, world=4 if nodes else 2, train=train, record=Row
    )


def table(rows: list[Row]) -> str:
    """Markdown: validation loss min / median / max against dense's median, seconds per
    run, bytes handed to collectives and put on the link (between nodes, in the hierarchical
    mode) against identity's (dense HSDP's), error-feedback memory per rank against the fp32
    model over the ranks per node."""
    by = by_label(rows)
    ref = statistics.median(r.val_loss for r in by["dense"]) if "dense" in by else None
    ident = by.get("identity")
    dense_link = statistics.median(r.link_bytes for r in ident) if ident else None
    lines = [
        "| run | transport | val loss min / median / max | vs dense (median) "
        "| s per run (median) | raw / wire | wire bytes | link bytes | link vs dense "
        "| EF bytes per rank | vs model / L |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in by.items():
        losses = sorted(r.val_loss for r in rs)
        med = statistics.median(losses)
        gap = f"{100 * (med / ref - 1):+.2f}%" if ref else "n/a"
        wire = statistics.median(r.wire_bytes for r in rs)
        link = statistics.median(r.link_bytes for r in rs)
        versus = f"1/{dense_link / link:.2f}" if dense_link and link else "n/a"
        ef = statistics.median(r.feedback_bytes for r in rs)
        share = ef / (rs[0].model_bytes / rs[0].ranks_per_node)
        raw = statistics.median(r.raw_bytes for r in rs)
        ratio = f"{raw / wire:.2f}" if wire else "n/a"
        lines.append(
            f"| {label} | {rs[0].transport or '-'} "
            f"| {losses[0]:.4f} / {med:.4f} / {losses[-1]:.4f} | {gap} "
            f"| {statistics.median(r.seconds for r in rs):.0f} | {ratio} | {wire:.0f} | {link:.0f} "
            f"| {versus} | {ef:.0f} | {share:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--only", default="", help="labels to run, separated by ';' (spec@opt=v)")
    ap.add_argument("--nodes", action="store_true", help="4 ranks as 2 nodes x 2 ranks")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--markdown", default="", help="also write the table here")
    args = ap.parse_args(argv)
    labels = args.only.split(";") if args.only else (NODE_LABELS if args.nodes else LABELS)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = Config(steps=args.steps)
    t0 = time.perf_counter()
    rows = run(labels, seeds, cfg, args.nodes)
    where = "2 nodes x 2 ranks" if args.nodes else "2 ranks"
    md = table(rows) + (
        f"\n\n{where}, {cfg.steps} steps, seeds {seeds}; {time.perf_counter() - t0:.0f} s"
    )
    write(md, [asdict(r) for r in rows], markdown_path=args.markdown, json_path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
