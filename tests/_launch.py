"""Start scripts under real launchers (horovodrun, mpirun) as subprocesses, with a deadline."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

#: a launch that takes longer has hung: it fails the test instead of stalling CI
DEADLINE_S = 400

BIN = pathlib.Path(sys.executable).parent


def launcher(kind: str, np: int = 2) -> list[str]:
    """The command prefix that starts ``np`` ranks with ``kind``."""
    if kind in ("gloo", "mpi"):
        return [str(BIN / "horovodrun"), "-np", str(np), f"--{kind}"]
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: make setup installs openmpi-bin"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, "-np", str(np), *root, "--oversubscribe", "-x", "PATH"]


def launch(kind: str, script: pathlib.Path, out: pathlib.Path, np: int = 2) -> list[dict]:
    """Run ``python script out`` on ``np`` ranks and return each rank's ``rank{r}.json``."""
    out.mkdir(parents=True, exist_ok=True)
    # This checkout first: the package may be installed (editable) from another one.
    path = os.pathsep.join([str(script.parent), str(pathlib.Path(__file__).resolve().parents[1])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [*launcher(kind, np), sys.executable, str(script), str(out)]
    # A session of its own, so a hang kills the launcher and every rank it started.
    proc = subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {DEADLINE_S}s:\n{stderr[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{stdout}\n{stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]
