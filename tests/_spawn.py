"""Run a worker function on N real gloo processes and collect what each rank saved.

Used by the ``run_ranks`` fixture in tests/conftest.py; workers call :func:`init`.

Ranks are started from a fork server that has imported torch and commhooks once
(``multiprocessing``'s ``forkserver`` method with preloaded modules): each rank is a fresh
process, as under ``spawn``, but starts in a fraction of a second instead of paying torch's
import (2-4 s of CPU a rank on this machine) on every run.
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing
import os
import pathlib
import runpy
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commhooks.mpi import _free_port

TIMEOUT = datetime.timedelta(seconds=60)
#: a run that takes longer has hung: it fails the test instead of stalling CI
DEADLINE_S = 300


#: imported once by the fork server, so that a rank does not import them again. Building a
#: DistributedDataParallel imports torch._dynamo (with sympy and Inductor: about 900 modules,
#: 2.5-3 s of CPU a rank here); FSDP2 and its checkpoints import their own. A name that does
#: not import is skipped.
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch._dynamo",
    "torch.distributed.algorithms.ddp_comm_hooks",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "commhooks",
    "commhooks.ddp",
    "commhooks.kernels",
    "commhooks.federated",
    "commhooks.diloco",
    "commhooks.fsdp",
]
START_METHOD = "forkserver"


def entry(
    rank: int, fn: Any, world: int, tmp: str, args: tuple, env: dict[str, str] | None = None
) -> None:
    """What a started process runs: ``fn(rank, world, store_path, out_path, *args)``.

    ``env``: the parent's environment when the run started. A forked rank inherits the fork
    server's, taken when the server started; a test that sets a variable expects its ranks to
    see it, as spawned ones would."""
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    fn(rank, world, os.path.join(tmp, "store"), os.path.join(tmp, f"out{rank}.pt"), *args)


def _with_env(env: dict[str, str], fn: Any, rank: int, *args: Any) -> None:
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def forkserver_spawn(
    fn: Any,
    args: tuple = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> Any:
    """``torch.multiprocessing.spawn``, with the ranks started from the fork server (for the
    ``fast_spawn`` fixture, which puts it in place for benchmark code that calls
    ``mp.spawn``). ``fn``'s module must be importable from the ``sys.path`` the server started
    with: put its directory on the path when the test module is imported, not in a test."""
    del start_method  # always the fork server: that is the point
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    return mp.start_processes(
        functools.partial(_with_env, dict(os.environ), fn), args, nprocs, join, daemon,
        start_method="forkserver",
    )  # fmt: skip


def start(fn: Any, world: int, tmp: str, args: tuple = ()) -> Any:
    """Start ``world`` ranks running ``entry`` (not joined): torch's ``ProcessContext``."""
    if START_METHOD == "forkserver":
        # Takes effect when the server first starts (the first run of the session); later
        # calls change nothing.
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    return mp.start_processes(
        entry,
        args=(fn, world, tmp, args, dict(os.environ)),
        nprocs=world,
        join=False,
        start_method=START_METHOD,
    )


def init(rank: int, world: int, store_path: str) -> None:
    # One thread per rank: the ranks share this machine's two cores.
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def _join(ctx: Any, deadline: float, what: str) -> None:
    """Wait for torch's ``ProcessContext`` ``ctx`` (a rank's exception fails the test with its
    traceback); past ``deadline`` seconds, kill its processes and fail the test."""
    end = time.monotonic() + deadline
    while not ctx.join(timeout=max(0.1, min(5.0, end - time.monotonic()))):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} still running after {deadline}s")


def _script_entry(
    rank: int, script: str, argv: list[str], cwd: str, env: dict[str, str], logs: str
) -> None:
    """What :func:`run_script` starts: ``script argv`` as ``__main__`` in ``cwd``, as
    ``python script argv`` would run it; under ``torchrun``'s variables, as rank ``rank``. Its
    stdout and stderr go to ``logs``/out{rank} and err{rank}."""
    for fd, name in ((1, "out"), (2, "err")):
        log = os.open(os.path.join(logs, f"{name}{rank}"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log, fd)
        os.close(log)
    os.environ.clear()
    os.environ.update(env)
    if "WORLD_SIZE" in env:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
    os.chdir(cwd)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


def run_script(
    script: pathlib.Path,
    nprocs: int = 1,
    *,
    env: dict[str, str],
    args: Sequence[str] = (),
    cwd: pathlib.Path | None = None,
    deadline: float = DEADLINE_S,
) -> tuple[str, str]:
    """Run a Python file from the fork server and return what it printed (stdout and stderr,
    each the ranks' in rank order): once (``nprocs=1``), or on ``nprocs`` ranks with the
    variables ``torchrun --standalone`` gives each (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``, ...), so that ``init_process_group()`` and the frameworks
    find their group as under torchrun, without paying torch's import three times. A failure
    fails the test with the rank's traceback and the tail of every rank's output. The
    launchers themselves are tested where they are the subject (tests/launch, tests/examples).

    Args:
        script: the file; ``args`` follow it in ``sys.argv``.
        env: the processes' environment (before torchrun's variables are added).
        cwd: the working directory (default: the script's).
        deadline: seconds before the run counts as hung and is killed.
    """
    env = dict(env)
    if nprocs > 1:
        n = str(nprocs)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=n,
                   LOCAL_WORLD_SIZE=n, ROLE_WORLD_SIZE=n, GROUP_RANK="0", GROUP_WORLD_SIZE="1",
                   ROLE_NAME="default", TORCHELASTIC_RESTART_COUNT="0",
                   TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="none")  # fmt: skip
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as logs:
        where = str(cwd or script.parent)
        ctx = mp.start_processes(
            _script_entry, args=(str(script), list(args), where, env, logs), nprocs=nprocs,
            join=False, start_method="forkserver",
        )  # fmt: skip

        def output(name: str, tail: int | None = None) -> str:
            paths = [pathlib.Path(logs, f"{name}{r}") for r in range(nprocs)]
            texts = [p.read_text() if p.exists() else "" for p in paths]  # killed before it began
            return "".join(t[-tail:] if tail else t for t in texts)

        try:
            _join(ctx, deadline, str(script))
        except Exception as e:
            raise RuntimeError(f"{e}\n-- stdout --\n{output('out', 2000)}\n-- stderr --\n"
                               f"{output('err', 3000)}") from e  # fmt: skip
        return output("out"), output("err")


def ranks_runner(tmp_path: pathlib.Path) -> Callable[..., list[Any]]:
    """``run(fn, world, *args)``: spawn ``world`` processes running
    ``fn(rank, world, store_path, out_path, *args)``, wait (a crash, or a hang past
    ``deadline``, fails the test) and return what each rank saved to ``out_path``. The
    ``run_ranks`` fixture; module-scoped fixtures call it directly."""

    def run(fn: Callable[..., None], world: int, *args: Any, deadline: float = DEADLINE_S) -> Any:
        sub = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        sub.mkdir()
        _join(start(fn, world, str(sub), args), deadline, f"{fn.__name__} on {world} ranks")
        return [torch.load(sub / f"out{r}.pt", weights_only=False) for r in range(world)]

    return run
