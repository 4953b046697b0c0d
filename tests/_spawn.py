"""Run a worker function on N real gloo processes (spawned) and collect what each rank saved.

Used by the ``run_ranks`` fixture in tests/conftest.py; workers call :func:`init`.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

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
