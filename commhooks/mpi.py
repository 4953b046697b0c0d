"""Start torch.distributed under plain ``mpirun``: torch from PyPI has no MPI backend, so the
MPI world is mapped onto torch's ``env://`` variables (through mpi4py) and gloo or nccl runs."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["MpiWorld", "init_from_launcher", "init_process_group", "launched_by_mpi"]

#: what MPI launchers (Open MPI, MPICH/PMI, PMIx under srun) export to every process
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class MpiWorld:
    """Where this process sits in the MPI world, as torch's launchers would say it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_process_group(
    backend: str | None = None, timeout: datetime.timedelta = datetime.timedelta(minutes=5)
) -> MpiWorld:
    """Initialise torch.distributed from the MPI world this process was started in.

    1. Rank, world size, local rank and local world size come from ``MPI.COMM_WORLD`` and its
       shared-memory split (one per node).
    2. Rank 0 picks the rendezvous address and a free port and broadcasts them over MPI;
       ``MASTER_ADDR`` / ``MASTER_PORT`` already set in rank 0's environment win (set them for
       multi-node jobs whose node names do not resolve from the other nodes).
    3. ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
       ``MASTER_PORT`` are exported, so code written for torchrun reads them unchanged, and the
       process group starts with ``init_method="env://"``.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl where CUDA is available (each rank then
            takes GPU ``local_rank``), else gloo.
        timeout: for the rendezvous and every collective.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: must be 'gloo' or 'nccl' (torch has no MPI here)")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised")
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("commhooks.mpi needs mpi4py: pip install 'commhooks[mpi]'") from e
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr, port = None, None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = int(os.environ.get("MASTER_PORT") or _free_port())
    addr, port = comm.bcast((addr, port), root=0)
    world = MpiWorld(
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        local_rank=node.Get_rank(),
        local_world_size=node.Get_size(),
        master_addr=addr,
        master_port=port,
    )
    node.Free()
    os.environ.update(
        RANK=str(world.rank),
        WORLD_SIZE=str(world.world_size),
        LOCAL_RANK=str(world.local_rank),
        LOCAL_WORLD_SIZE=str(world.local_world_size),
        MASTER_ADDR=world.master_addr,
        MASTER_PORT=str(world.master_port),
    )
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(
        backend, init_method="env://", rank=world.rank, world_size=world.world_size, timeout=timeout
    )
    return world


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, ``srun --mpi=...``) started this process and
    no torch launcher did (torchrun's ``RANK`` is not set)."""
    return "RANK" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARS)


def init_from_launcher(
    backend: str | None = None, timeout: datetime.timedelta = datetime.timedelta(minutes=5)
) -> None:
    """Initialise torch.distributed under whichever launcher started this process.

    Under torchrun (or anything that exports ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``) the group starts from those variables; under an MPI launcher it starts
    through :func:`init_process_group`. Scripts that call this run unchanged under
    ``commhooks-launch torchrun``, ``mpirun`` and ``shaped``.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl where CUDA is available, else gloo.
        timeout: for the rendezvous and every collective.
    """
    if launched_by_mpi():
        init_process_group(backend, timeout)
        return
    if "RANK" not in os.environ:
        raise RuntimeError(
            "RANK: not set; start this script with torchrun, mpirun or commhooks-launch "
            "(no launcher variables found)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
