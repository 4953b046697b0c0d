"""commhooks.mpi: a DDP + commhooks job under plain ``mpirun`` (no Horovod)."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _launch import launch

import commhooks.mpi


def test_mpirun_runs_a_bridged_ddp_job(tmp_path: Any) -> None:
    ranks = launch("mpirun", pathlib.Path(__file__).with_name("_mpi_worker.py"), tmp_path)
    for r, out in enumerate(ranks):
        w = out["world"]
        assert (w["rank"], w["world_size"], w["local_rank"], w["local_world_size"]) == (r, 2, r, 2)
        assert out["world"]["env_rank"] == str(r)
        assert out["backend"] == "gloo"
        assert out["lossless_vs_dense"] == 0.0
        assert out["sign_replicas_equal"]
    assert ranks[0]["world"]["master_port"] == ranks[1]["world"]["master_port"] > 0


def test_bad_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend='mpi'"):
        commhooks.mpi.init_process_group("mpi")
