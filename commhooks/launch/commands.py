"""The exact commands the thin launchers in ``launch/`` run; each can be printed instead."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence

__all__ = ["executable", "horovodrun", "mpirun", "quote", "torchrun"]


def executable(name: str) -> str:
    """``name`` next to this Python (the venv's), else on PATH, else bare."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or name)


def _python(script: Sequence[str]) -> list[str]:
    """horovodrun and mpirun start programs, not Python files: put this Python before a .py."""
    script = list(script)
    return [sys.executable, *script] if script and script[0].endswith(".py") else script


def _check_np(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r}: must be an int >= 1")


def torchrun(
    script: Sequence[str],
    nproc: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "commhooks",
) -> list[str]:
    """torchrun, single-node (``--standalone``) or multi-node with c10d rendezvous at
    ``rdzv_endpoint`` (``host:port``, the same on every node)."""
    _check_np("nproc", nproc)
    _check_np("nnodes", nnodes)
    cmd = [executable("torchrun"), f"--nproc_per_node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint={rdzv_endpoint!r}: multi-node needs host:port")
        cmd += [
            f"--nnodes={nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}",
            f"--rdzv_id={rdzv_id}",
        ]
    return [*cmd, *script]


def horovodrun(
    script: Sequence[str], np: int, controller: str = "gloo", hosts: str | None = None
) -> list[str]:
    """horovodrun with the gloo or MPI controller; ``hosts`` as Horovod's ``-H``
    (``"a:4,b:4"``)."""
    _check_np("np", np)
    if controller not in ("gloo", "mpi"):
        raise ValueError(f"controller={controller!r}: must be 'gloo' or 'mpi'")
    cmd = [executable("horovodrun"), "-np", str(np), f"--{controller}"]
    if hosts:
        cmd += ["-H", hosts]
    return [*cmd, *_python(script)]


def mpirun(script: Sequence[str], np: int, hosts: str | None = None) -> list[str]:
    """Open MPI's mpirun. The script starts torch.distributed with
    :func:`commhooks.mpi.init_process_group` (or uses Horovod). As root, Open MPI needs
    ``--allow-run-as-root``; ``--oversubscribe`` lets ``np`` exceed the cores."""
    _check_np("np", np)
    cmd = [executable("mpirun"), "-np", str(np)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["--oversubscribe", "-x", "PATH"]
    if hosts:
        cmd += ["-H", hosts]
    return [*cmd, *_python(script)]


def quote(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)
