"""A DDP job on one GPU with every compressor: part of ``make gpu-check``.

    python scripts/gpu_ddp_job.py --backend nccl --world 1 --out ddp-nccl.json
    python scripts/gpu_ddp_job.py --backend gloo --world 2 --out ddp-gloo.json

Every rank uses ``cuda:0`` (two ranks share the GPU; NCCL refuses that, so the 2-rank job runs
over gloo with CUDA tensors). For each compressor at its defaults, plus a few variants (the
summable int8, top-k through reduce-scatter, bf16 gradients), it trains a small MLP for a few
steps with the commhooks hook and records whether every loss is finite, whether the ranks'
parameters agree afterwards, and the median step time. Rank 0 writes one JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import commhooks
import commhooks.ddp

EXTRA = [
    "uniform:bits=8,shared_scale=true",
    "uniform:bits=4",
    "uniform:bits=2,stochastic=true",
    "topk:ratio=0.01@transport=reducescatter",
    "powersgd:rank=4",
    "sign@dtype=bf16",
    "uniform:bits=8,shared_scale=true@dtype=bf16",
]


def _variants() -> list[str]:
    return commhooks.available() + EXTRA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_one(
    label: str, rank: int, world: int, steps: int, device: torch.device
) -> dict[str, object]:
    spec, _, option = label.partition("@")
    options: dict[str, object] = {}
    dtype = torch.float32
    if option.startswith("dtype="):
        dtype = getattr(torch, {"bf16": "bfloat16"}.get(option[6:], option[6:]))
    elif option:
        key, _, value = option.partition("=")
        options[key] = value
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256))
    model = model.to(device, dtype)
    ids = [0] if world == 1 and device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    commhooks.ddp.register(ddp, spec, **options)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(rank)
    times, finite = [], True
    for _ in range(steps):
        x = torch.randn(256, 1024, device=device, dtype=dtype, generator=gen)
        _sync(device)
        start = time.perf_counter()
        loss = ddp(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        _sync(device)
        times.append(time.perf_counter() - start)
        finite &= bool(torch.isfinite(loss))
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    agree = all(torch.equal(gathered[0], g) for g in gathered)
    return {
        "variant": label, "ok": finite and agree, "finite": finite, "ranks_agree": agree,
        "step_ms_median": 1e3 * statistics.median(times[1:] or times),
    }  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(
    rank: int, world: int, backend: str, port: int, steps: int, out: str, device: str,
    variants: list[str],
) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world)
    rows = []
    for label in variants:
        try:
            rows.append(_run_one(label, rank, world, steps, dev))
        except Exception as e:  # a failing compressor is a row of the report, not the end
            traceback.print_exc()
            rows.append({"variant": label, "ok": False, "error": f"{type(e).__name__}: {e}"})
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"backend": backend, "world": world, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda:0", help="cpu: a dry run of this script (gloo)")
    ap.add_argument("--variants", default="", help="';'-separated labels (default: all)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(";") if v] or _variants()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_ddp_job: no CUDA device here", file=sys.stderr)
        return 2
    if args.backend == "nccl" and args.world > 1 and torch.cuda.device_count() < args.world:
        # NCCL cannot put two ranks on one GPU ("Duplicate GPU detected"): refuse up front
        # rather than hang in the first collective.
        print("gpu_ddp_job: NCCL needs a GPU per rank; use --backend gloo", file=sys.stderr)
        return 2
    mp.spawn(
        _worker, nprocs=args.world, join=True,
        args=(args.world, args.backend, _free_port(), args.steps, args.out, args.device, variants),
    )  # fmt: skip
    with open(args.out) as f:
        rows = json.load(f)["rows"]
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
