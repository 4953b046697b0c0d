"""Every example in examples/, run at a small size under its real launcher."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
BIN = pathlib.Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_ddp_train_with_options() -> None:
    out = _run([*TORCHRUN, str(EX / "ddp_train.py"), "--epochs", "1", "--compressor",
                "powersgd:rank=2", "--start-iter", "3", "--wrapper", "fp16"])  # fmt: skip
    assert "compressor=powersgd:rank=2 test accuracy" in out and "ratio" in out


def test_federated_clients_reports_uplink_per_client() -> None:
    out = _run([*TORCHRUN, str(EX / "federated_clients.py"), "--epochs", "1"])
    rows = [
        line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")
    ]
    assert len(rows) == 2
    for row in rows:
        uplink, dense = (int(c.strip().replace(",", "")) for c in row.split("|")[4:6])
        assert 0 < uplink < dense / 10


def test_horovod_train() -> None:
    out = _run([str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable,
                str(EX / "horovod_train.py"), "--epochs", "1", "--compressor", "sign"])  # fmt: skip
    assert "compressor=sign test accuracy" in out


def test_accelerate_snippet() -> None:
    out = _run([*TORCHRUN, str(EX / "accelerate_ddp.py")])
    assert "accelerate + commhooks: ratio" in out


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None,
    reason="lightning is not installed (and not on this project's package index)",
)
def test_lightning_snippet() -> None:
    _run([sys.executable, str(EX / "lightning_ddp.py")])
