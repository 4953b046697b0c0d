"""FSDP2 on 2 nodes x 2 ranks over a shaped link between the nodes: dense HSDP against the
hierarchical compressed mode of :func:`commhooks.fsdp.register`.

Usage (root): ``python benchmarks/fsdp_shaped.py [--rate 100mbit] [--specs
"uniform:bits=4;uniform:bits=8"] [--width 256] [--steps 8] [--warmup 2] [--out F.json]
[--markdown F.md] [--smoke]``; ``--rate unshaped`` runs over the namespaces' unshaped link,
``--smoke`` a tiny model for one step there.

Two network namespaces (:class:`commhooks.launch.ShapedCluster` with ``ranks_per_node=2``)
each run one torchrun of 2 ranks; traffic between the nodes crosses one veth pair shaped to
``--rate``, traffic inside a node goes over loopback, unshaped. The model is the transformer
of ``benchmarks/transformer_convergence.py`` at ``--width`` (AdamW, random text windows),
each encoder layer and the root ``fully_shard``-ed: over a 2-D mesh for dense HSDP, over the
node (:func:`commhooks.fsdp.node_mesh`) for the compressed runs. Every variant runs in the
same launch, one after the other.

Reported per variant: the step time (each step after a barrier, the slowest rank's; min /
median / max over the timed steps), the bytes each node's interface sent during the timed
steps (``tx_bytes`` of the namespace's interface: everything that crossed between the nodes,
headers included, per step and rank), and the error-feedback memory per rank against the
fp32 model over the ranks per node.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from _report import write
from fsdp_convergence import shard
from transformer_convergence import Config, TinyLM, batch_of, lm_loss, load_text

import commhooks.fsdp

DENSE = "dense"
SPECS = ["uniform:bits=4", "uniform:bits=8"]
RANKS_PER_NODE = 2


def _tx_bytes() -> int:
    """Bytes this namespace's interface has sent (the link between the nodes)."""
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
        return int(f.read())


def run_variant(label: str, args: argparse.Namespace, text: torch.Tensor) -> dict[str, Any]:
    """Warm-up and timed steps of one variant on every rank; what rank 0 reports."""
    cfg = Config(width=args.width, layers=args.layers)
    torch.manual_seed(0)
    model = TinyLM(cfg)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    shard(model, nodes=True, dense=label == DENSE)
    state = None if label == DENSE else commhooks.fsdp.register(model, label)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(dist.get_rank())
    times: list[float] = []
    tx0 = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            tx0 = _tx_bytes()
        dist.barrier()
        t0 = time.perf_counter()
        starts = torch.randint(len(text) - cfg.context - 1, (cfg.batch,), generator=g)
        opt.zero_grad()
        lm_loss(model, *batch_of(text, starts, cfg.context)).backward()
        opt.step()
        took = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        if step >= args.warmup:
            times.append(float(took))
    dist.barrier()
    # Each node's interface counts both of its ranks; local rank 0 reads it for the node.
    sent = torch.tensor([_tx_bytes() - tx0 if int(os.environ["LOCAL_RANK"]) == 0 else 0])
    dist.all_reduce(sent)
    ef = torch.tensor([state.feedback_bytes() if state is not None else 0])
    dist.all_reduce(ef, op=dist.ReduceOp.MAX)
    return {
        "step_s": times,
        "tx_bytes_per_rank_step": float(sent) / dist.get_world_size() / args.steps,
        "feedback_bytes": int(ef),
        "model_bytes": model_bytes,
        "ratio": state.stats().ratio if state is not None else 1.0,
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    text = load_text(0)
    out = {label: run_variant(label, args, text) for label in [DENSE, *args.specs]}
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def markdown(rate: str, rows: dict[str, Any]) -> str:
    """One line per variant: step time, bytes between the nodes, error-feedback memory."""
    dense = rows[DENSE]
    lines = [
        "| link | run | step s (min / median / max) | vs dense (median) "
        "| inter-node bytes per rank and step | vs dense | EF bytes per rank | vs model / L |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        s = r["step_s"]
        med = statistics.median(s)
        tx = r["tx_bytes_per_rank_step"]
        share = r["feedback_bytes"] / (r["model_bytes"] / RANKS_PER_NODE)
        lines.append(
            f"| {rate} | {label} | {min(s):.3f} / {med:.3f} / {max(s):.3f} "
            f"| {med / statistics.median(dense['step_s']):.2f} | {tx:.0f} "
            f"| 1/{dense['tx_bytes_per_rank_step'] / tx:.2f} | {r['feedback_bytes']} "
            f"| {share:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="100mbit", help="tc rate of the link, or 'unshaped'")
    ap.add_argument("--specs", default=";".join(SPECS), help="';'-separated compressor specs")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step, unshaped")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--markdown", default=None, help="Markdown table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if isinstance(args.specs, str):
        args.specs = [s for s in args.specs.split(";") if s]
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.rate, args.width, args.steps, args.warmup = "unshaped", 32, 1, 1
        args.specs = args.specs[:1]
    from commhooks.launch.cli import shaped_commands
    from commhooks.launch.netns import Link, ShapedCluster

    for spec in args.specs:
        commhooks.compressor(spec)  # a bad spec fails here, before any process starts
    cluster = ShapedCluster(
        2, Link(None if args.rate == "unshaped" else args.rate), ranks_per_node=RANKS_PER_NODE
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        script = [
            os.path.abspath(__file__), "--worker", "--result", result,
            "--specs", ";".join(args.specs), "--width", str(args.width),
            "--layers", str(args.layers), "--steps", str(args.steps),
            "--warmup", str(args.warmup),
        ]  # fmt: skip
        t0 = time.perf_counter()
        cmds = shaped_commands(cluster, script, random.randint(20000, 59999))
        with cluster:
            codes = cluster.run(cmds, env={"OMP_NUM_THREADS": "1"}, timeout_s=args.timeout_s)
        if any(codes):
            raise RuntimeError(f"ranks exited with {codes}")
        with open(result) as f:
            rows = json.load(f)
    text = markdown(args.rate, rows) + (
        f"\n\n2 nodes x {RANKS_PER_NODE} ranks, width {args.width}, {args.steps} timed steps "
        f"after {args.warmup}; {time.perf_counter() - t0:.0f} s"
    )
    write(text, {"config": vars(args), "rows": rows}, args.markdown or "", args.out or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
