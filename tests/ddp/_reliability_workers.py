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
