"""Shared pytest set-up, and the ``run_ranks`` fixture for multi-process tests."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

from _spawn import DEADLINE_S, entry

# The suite runs on 2 shared cores; hypothesis' timing health checks would flake there.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci")


@pytest.fixture
def run_ranks(tmp_path: Any) -> Callable[..., list[Any]]:
    """``run_ranks(fn, world, *args)``: spawn ``world`` processes running
    ``fn(rank, world, store_path, out_path, *args)``, wait (a crash, or a hang past
    ``DEADLINE_S``, fails the test) and return what each rank saved to ``out_path``."""

    def run(fn: Callable[..., None], world: int, *args: Any, deadline: float = DEADLINE_S) -> Any:
        sub = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        sub.mkdir()
        ctx = mp.start_processes(
            entry, args=(fn, world, str(sub), args), nprocs=world, join=False, start_method="spawn"
        )
        end = time.monotonic() + deadline
        while not ctx.join(timeout=max(0.1, min(5.0, end - time.monotonic()))):
            if time.monotonic() > end:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{fn.__name__} on {world} ranks still running after {deadline}s")
        return [torch.load(sub / f"out{r}.pt", weights_only=False) for r in range(world)]

    return run
