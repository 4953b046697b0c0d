"""docker/: the Dockerfiles lint clean and build with the same scripts the tests run.

No Docker engine runs here; hadolint (from PyPI) checks them, and these tests check that their
RUN steps go through scripts/ensure-apt.sh and `make setup` (so scripts/install-horovod.sh),
which `make test` itself exercises on every CI run.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def test_both_images_exist() -> None:
    assert [f.name for f in FILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path: pathlib.Path) -> None:
    hadolint = pathlib.Path(sys.executable).with_name("hadolint")
    res = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_runs_the_projects_own_setup(path: pathlib.Path) -> None:
    text = path.read_text()
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text, re.M | re.S))
    assert "scripts/ensure-apt.sh" in runs and "make setup" in runs
    assert "apt-get install" not in runs and "pip install" not in runs  # only via the scripts
    makefile = (ROOT / "Makefile").read_text()
    assert "bash scripts/install-horovod.sh" in makefile


def test_cuda_image_builds_horovod_with_nccl_against_stubs() -> None:
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text
    assert "/usr/local/cuda/lib64/stubs" in text
