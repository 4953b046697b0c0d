"""Run a worker function on N real gloo processes (spawned) and collect what each rank saved.

Used by the ``run_ranks`` fixture in tests/conftest.py; workers call :func:`init`.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)
#: a run that takes longer has hung: it fails the test instead of stalling CI
DEADLINE_S = 300


def entry(rank: int, fn: Any, world: int, tmp: str, args: tuple) -> None:
    """What a spawned process runs: ``fn(rank, world, store_path, out_path, *args)``."""
    fn(rank, world, os.path.join(tmp, "store"), os.path.join(tmp, f"out{rank}.pt"), *args)


def init(rank: int, world: int, store_path: str) -> None:
    # One thread per rank: the ranks share this machine's two cores.
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def ranks_runner(tmp_path: pathlib.Path) -> Callable[..., list[Any]]:
    """``run(fn, world, *args)``: spawn ``world`` processes running
    ``fn(rank, world, store_path, out_path, *args)``, wait (a crash, or a hang past
    ``deadline``, fails the test) and return what each rank saved to ``out_path``. The
    ``run_ranks`` fixture; module-scoped fixtures call it directly."""

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
