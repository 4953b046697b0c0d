"""``make gpu-check`` without a GPU: it says so and exits 0; its DDP job and its report run
here too (the job on CPU tensors over gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)],
        cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "no CUDA device here" in res.stdout
    assert "no CUDA device here" in (tmp_path / "report.md").read_text()


def test_the_ddp_job_runs_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's code path on CPU tensors (one rank over gloo): a compressor with bf16
    gradients, and a row per variant in the JSON the report reads."""
    out = tmp_path / "ddp.json"
    res = subprocess.run(
        [sys.executable, "scripts/gpu_ddp_job.py", "--backend", "gloo", "--world", "1",
         "--device", "cpu", "--steps", "2", "--variants",
         "uniform:bits=8,shared_scale=true@dtype=bf16;sign", "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["uniform:bits=8,shared_scale=true@dtype=bf16", "sign"]
    assert all(r["ok"] and r["finite"] and r["ranks_agree"] for r in rows)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", check)  # its dataclass looks itself up
    spec.loader.exec_module(check)
    step = check.Step("ddp", [sys.executable, "-c", "print('fine')"], 60)
    step.run(tmp_path)
    (tmp_path / "ddp.json").write_text(out.read_text())
    text = check.report([step], tmp_path, "machine")
    assert "| ddp | pass |" in text and "`sign` | yes |" in text
