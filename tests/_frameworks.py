"""Run scripts under real launchers (python, torchrun, accelerate launch), or on ranks
from the fork server with torchrun's variables, and read the hook stats each rank prints as
``commhooks rank=R steps=S raw_bytes=B wire_bytes=W ratio=X``."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from _spawn import run_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
# On a CPU machine without an accelerate config, only --multi_gpu starts 2 processes.
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0"]  # fmt: skip
# This checkout's commhooks, in every process the launchers start; nothing from the hub.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "HF_HUB_OFFLINE": "1",
}
# No line anchor: two ranks writing to one pipe can leave their lines unseparated.
_STATS = re.compile(r"commhooks rank=(\d+) steps=(\d+) raw_bytes=(\d+) wire_bytes=(\d+) ")


def run(cmd: list[str], timeout: float = 300) -> str:
    """Run ``cmd`` from the repository root; fail with its output unless it exits 0."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def on_ranks(script: pathlib.Path, *args: str, timeout: float = 300) -> str:
    """Run ``script args`` on 2 ranks from the fork server with the variables torchrun sets
    (:func:`_spawn.run_script`), from the repository root; return what the ranks printed."""
    return run_script(script, 2, env=ENV, args=args, cwd=ROOT, deadline=timeout)[0]


def hook_stats(out: str) -> dict[int, tuple[int, int, int]]:
    """``{rank: (steps, raw_bytes, wire_bytes)}`` from the lines the ranks printed."""
    return {int(m[1]): (int(m[2]), int(m[3]), int(m[4])) for m in _STATS.finditer(out)}


def assert_compressed(out: str, world: int = 2) -> dict[int, tuple[int, int, int]]:
    """Every rank ran compressed steps that sent fewer bytes than a dense all-reduce."""
    stats = hook_stats(out)
    assert sorted(stats) == list(range(world)), f"stats of ranks {sorted(stats)}:\n{out[-2000:]}"
    for rank, (steps, raw, wire) in stats.items():
        assert steps > 0, f"rank {rank}: the hook never ran"
        assert 0 < wire < raw, f"rank {rank}: wire {wire} B against raw {raw} B"
    return stats
