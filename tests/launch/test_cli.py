"""commhooks-launch and the thin scripts in launch/: the exact commands, and a real run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from commhooks.launch import commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def _dry(*args: str) -> str:
    res = subprocess.run(
        [str(BIN / "commhooks-launch"), *args], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stderr.strip()


def test_torchrun_single_and_multi_node() -> None:
    assert _dry("torchrun", "--nproc", "4", "--dry-run", "--", "t.py", "--x", "1") == (
        f"{BIN / 'torchrun'} --nproc_per_node=4 --standalone t.py --x 1"
    )
    multi = _dry("torchrun", "--nproc", "2", "--nnodes", "3", "--rdzv-endpoint", "n0:29400",
                 "--dry-run", "--", "t.py")  # fmt: skip
    assert multi == (
        f"{BIN / 'torchrun'} --nproc_per_node=2 --nnodes=3 --rdzv_backend=c10d "
        "--rdzv_endpoint=n0:29400 --rdzv_id=commhooks t.py"
    )


def test_horovodrun_and_mpirun_put_python_before_a_script() -> None:
    assert _dry("horovodrun", "--np", "2", "--controller", "mpi", "--dry-run", "--", "h.py") == (
        f"{BIN / 'horovodrun'} -np 2 --mpi {sys.executable} h.py"
    )
    root = " --allow-run-as-root" if os.geteuid() == 0 else ""
    line = _dry("mpirun", "--np", "3", "--hosts", "a:2,b:1", "--dry-run", "--", "m.py")
    assert line.endswith(f"-np 3{root} --oversubscribe -x PATH -H a:2,b:1 {sys.executable} m.py")


def test_shaped_dry_run_prints_one_rank_per_namespace() -> None:
    lines = _dry("shaped", "--n", "3", "--rate", "100mbit", "--dry-run", "--", "t.py").splitlines()
    assert lines[0] == "# 3 namespaces chk0..chk2, 100mbit, +0.0 ms"
    for i, line in enumerate(lines[1:]):
        assert line.startswith(f"ip netns exec chk{i} {BIN / 'torchrun'} --nnodes=3 ")
        assert f"--node_rank={i} --nproc_per_node=1 --master_addr=10.213.0.1" in line
        assert line.endswith(" t.py")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: commands.torchrun(["t.py"], 0), "nproc"),
        (lambda: commands.torchrun(["t.py"], 2, nnodes=2), "rdzv_endpoint"),
        (lambda: commands.horovodrun(["t.py"], 2, controller="nccl"), "controller"),
        (lambda: commands.mpirun(["t.py"], -1), "np"),
    ],
)
def test_bad_arguments_name_the_field(call: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        call()  # type: ignore[operator]


def test_thin_script_runs_a_real_job() -> None:
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc", "2", "--",
         str(ROOT / "examples" / "ddp_train.py"), "--epochs", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--nproc_per_node=2 --standalone" in res.stderr
    assert "test accuracy" in res.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the shaped cluster needs root")
def test_shaped_launcher_runs_a_real_job() -> None:
    res = subprocess.run(
        [str(BIN / "commhooks-launch"), "shaped", "--n", "2", "--rate", "200mbit", "--",
         str(ROOT / "examples" / "ddp_train.py"), "--epochs", "1", "--compressor", "sign"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compressor=sign test accuracy" in res.stdout


@pytest.mark.parametrize("name", ["torchrun.sbatch", "horovod.sbatch"])
def test_slurm_templates_parse_and_use_the_launchers(name: str) -> None:
    path = ROOT / "launch" / "slurm" / name
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    text = path.read_text()
    assert "#SBATCH" in text and "srun " in text
    if name.startswith("torchrun"):
        assert "commhooks.launch.cli torchrun" in text and "--rdzv-endpoint" in text
