"""``make demo``'s job at a small size: torchrun workers, the table, the plot, TensorBoard."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

BIN = pathlib.Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _demo(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [str(BIN / "commhooks-demo"), "--out", str(out), "--world", "2", "--epochs", "2",
         "--runs", "dense;topk 1% + EF=topk:ratio=0.01;sign", *extra],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _check(out: pathlib.Path, res: subprocess.CompletedProcess[str]) -> list[dict]:
    curves = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in curves] == ["dense", "topk 1% + EF", "sign"]
    dense, topk, sign = curves
    assert dense["ratio"] == 1.0 and topk["ratio"] > 10 and sign["ratio"] > 10
    assert topk["wire_bytes_per_step"] < dense["wire_bytes_per_step"] / 10
    for c in curves:
        assert c["epochs"] == [1, 2] and len(c["accuracy"]) == 2 and c["step_ms"] > 0
        assert c["sent_bytes"][0] < c["sent_bytes"][1]
        assert c["accuracy"][-1] > 30.0, c  # learning, not noise (10 classes)
    assert (out / "accuracy_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 3
    assert "| run | test accuracy % | wire bytes / step | ratio | step ms |" in res.stdout
    assert "%|" in res.stderr  # rank 0's progress bar
    return curves


def test_demo_runs_dense_and_compressors(tmp_path: pathlib.Path) -> None:
    res = _demo(tmp_path)
    assert "--standalone" in res.stderr  # the torchrun command is printed
    _check(tmp_path, res)


@pytest.mark.skipif(os.geteuid() != 0, reason="the shaped cluster needs root")
def test_demo_over_shaped_links(tmp_path: pathlib.Path) -> None:
    res = _demo(tmp_path, "--rate", "100mbit")
    assert "ip netns exec chk0" in res.stderr
    _check(tmp_path, res)
    assert "shaped 100mbit" in res.stdout


def test_bad_spec_fails_before_any_process_starts(tmp_path: pathlib.Path) -> None:
    res = subprocess.run(
        [str(BIN / "commhooks-demo"), "--out", str(tmp_path), "--runs", "x=topk:ratio=3"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert res.returncode != 0 and "ratio=3.0: must be <= 1.0" in res.stderr
    assert "torchrun" not in res.stderr
