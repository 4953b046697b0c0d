"""Worker bodies for tests/ddp/test_reliability.py (started by torch.multiprocessing.spawn):
each runs one adversarial case on real gloo ranks and saves what every rank saw."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from _spawn import init
from _workers import batch, make_model
from torch import nn

import commhooks.ddp
from commhooks.comm.hierarchical import LAUNCHER_ENV


def _finish(out: str, result: Any) -> None:
    torch.save(result, out)
    dist.barrier()  # ranks leave together: one tearing gloo down while another sends aborts it


def large_gradients(
    rank: int, world: int, store_path: str, out: str, specs: list[str], scale: float
) -> None:
    """Backward of the loss times ``scale`` (large but finite gradients) under each spec:
    every rank's averaged gradients, PowerSGD's widened rounds and the hook's stats."""
    init(rank, world, store_path)
    try:
        result = {}
        for spec in specs:
            ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.01)
            state = commhooks.ddp.register(ddp, spec, min_numel=0)
            grads = []
            for step in range(3):
                ddp.zero_grad()
                x, y = batch(rank, step)
                (nn.functional.cross_entropy(ddp(x), y) * scale).backward()
                grads.append([p.grad.clone() for p in ddp.parameters()])
            result[spec] = {
                "grads": grads,
                "widened": getattr(state.compressor, "widened_rounds", 0),
                "stats": state.stats(),
            }
        _finish(out, result)
    finally:
        gc.collect()
        dist.destroy_process_group()


def _gathered_equal(params: list[torch.Tensor]) -> bool:
    """Whether ``params`` are identical on every rank."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], f) for f in everyone)


def updates_holes(rank: int, world: int, store_path: str, out: str) -> None:
    """compress_updates against what it cannot average by itself: an optimizer over part of
    the model; a layer unfrozen and added with add_param_group; a GradScaler that overflows
    on rank 1 only."""
    init(rank, world, store_path)
    try:
        result: dict[str, Any] = {}
        # An optimizer that misses the last layer: refused, naming it, on every rank.
        ddp = nn.parallel.DistributedDataParallel(make_model())
        part = torch.optim.AdamW(ddp.module[:4].parameters(), lr=1e-2)
        try:
            commhooks.ddp.compress_updates(ddp, part, "sign", min_numel=64)
            result["partial"] = "accepted"
        except ValueError as e:
            result["partial"] = str(e)
        # The last layer frozen when wrapped, unfrozen and added two steps later.
        model = make_model()
        head = model[4]
        head.requires_grad_(False)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt = commhooks.ddp.compress_updates(ddp, opt, "sign", min_numel=64)
        before = [p.detach().clone() for p in head.parameters()]
        for step in range(5):
            if step == 2:
                head.requires_grad_(True)
                opt.add_param_group({"params": list(head.parameters())})
            x, y = batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        result["added_moved"] = any(
            not torch.equal(a, b) for a, b in zip(before, head.parameters())
        )
        result["added_equal"] = _gathered_equal(list(model.parameters()))
        # A GradScaler whose step overflows on rank 1 only, at step 2.
        ddp = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        opt = commhooks.ddp.compress_updates(ddp, opt, "sign", min_numel=64,
                                             small_on_gradients=False)  # fmt: skip
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        params, scales = [], []
        for step in range(5):
            x, y = batch(rank, step)
            if step == 2 and rank == 1:
                x[0, 0] = float("inf")
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(ddp(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            params.append(torch.cat([p.detach().reshape(-1) for p in ddp.parameters()]))
            scales.append(scaler.get_scale())
        result["scaler_skipped"] = torch.equal(params[1], params[2])
        result["scaler_moved"] = not torch.equal(params[2], params[4])
        result["scaler_finite"] = bool(torch.isfinite(params[-1]).all())
        result["scaler_equal"] = _gathered_equal(list(ddp.parameters()))
        result["scales"] = scales
        result["steps"] = opt.stats().steps
        result["skipped"] = opt.stats().nonfinite_steps
        _finish(out, result)
    finally:
        gc.collect()
        dist.destroy_process_group()


_LAUNCHER_VARS = [v for pair in LAUNCHER_ENV for v in pair]


def topology_cases(rank: int, world: int, store_path: str, out: str, cases: list) -> None:
    """Each case: per rank, (hook options, launcher variables); two steps under the hook.
    Records each case's error message, or the layout the hook ran under."""
    import os

    init(rank, world, store_path)
    try:
        result = []
        for case in cases:
            options, env = case[rank]
            for var in _LAUNCHER_VARS:
                os.environ.pop(var, None)
            os.environ.update(env)
            ddp = nn.parallel.DistributedDataParallel(make_model())
            state = commhooks.ddp.register(ddp, "topk:ratio=0.1", min_numel=0, **options)
            try:
                for step in range(2):
                    x, y = batch(rank, step)
                    nn.functional.cross_entropy(ddp(x), y).backward()
                result.append({"layout": state.layout, "ratio": state.stats().ratio})
            except Exception as e:
                result.append({"error": f"{type(e).__name__}: {e}"})
            del ddp, state
            gc.collect()
        _finish(out, result)
    finally:
        gc.collect()
        dist.destroy_process_group()
