"""commhooks' Horovod optimizer with the hierarchical topology, on 2 fake nodes x 2 ranks under
``horovodrun --gloo`` (two host names for this machine)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from _launch import BIN, DEADLINE_S

WORKER = pathlib.Path(__file__).with_name("_hvd_nodes.py")


def test_two_fake_nodes_use_horovods_local_and_cross_communicators(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOROVOD_DYNAMIC_PROCESS_SETS": "1"}
    cmd = [str(BIN / "horovodrun"), "--gloo", "-np", "4", "-H", "localhost:2,127.0.0.1:2",
           sys.executable, str(WORKER), str(tmp_path)]  # fmt: skip
    out = subprocess.PIPE
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log = proc.communicate(timeout=DEADLINE_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{' '.join(cmd)} still running after {DEADLINE_S}s")
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, rec in enumerate(ranks):
        assert rec["local"] == [r % 2, 2] and rec["cross"] == [r // 2, 2]
        assert rec["layouts"] == ["flat", "hierarchical:2x2", "hierarchical:2x2"]
        assert rec["equal"] == [True, True, True]
        assert rec["node_bytes"][0] == 0 and rec["node_bytes"][1] > 0
        assert rec["identity_vs_flat"] < 1e-5
