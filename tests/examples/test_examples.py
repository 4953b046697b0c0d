"""Every example in examples/, run at a small size under its real launcher.

examples/horovod_train.py runs in tests/launch/test_cli.py (horovodrun --gloo, twice, checking
the accuracy line and that the runs agree), and so does examples/ddp_train.py (torchrun with its
options, mpirun, the shaped cluster), not again here."""

from __future__ import annotations

import re
import sys

from _frameworks import ACCELERATE, ROOT, TORCHRUN, assert_compressed
from _frameworks import run as _run

EX = ROOT / "examples"


def test_federated_clients_reports_uplink_per_client() -> None:
    # Under torchrun only: mpirun's path (mpi4py) is the one examples/ddp_train.py takes there.
    out = _run([*TORCHRUN, str(EX / "federated_clients.py"), "--epochs", "1"])
    assert re.search(r"test, ratio [0-9.]+x", out), out
    assert float(re.findall(r"ratio ([0-9.]+)x", out)[0]) > 10
    rows = [
        line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")
    ]
    assert len(rows) == 2
    for row in rows:
        uplink, dense = (int(c.strip().replace(",", "")) for c in row.split("|")[4:6])
        assert 0 < uplink < dense / 10


def test_accelerate_under_accelerate_launch_compresses() -> None:
    assert_compressed(_run([*ACCELERATE, str(EX / "accelerate_ddp.py")]))


def test_accelerate_under_torchrun_compresses() -> None:
    assert_compressed(_run([*TORCHRUN, str(EX / "accelerate_ddp.py")]))


def test_lightning_on_cpu_compresses() -> None:
    # Lightning's own launcher starts the second process.
    assert_compressed(_run([sys.executable, str(EX / "lightning_ddp.py")]))


def test_hf_trainer_compresses() -> None:
    assert_compressed(_run([*TORCHRUN, str(EX / "hf_trainer.py")]))
