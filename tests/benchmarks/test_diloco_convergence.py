"""Smoke test of ``benchmarks/diloco_convergence.py``: DDP and DiLoCo rounds (compressed,
and streaming with 4 fragments) on the tiny transformer train, the rounds send fewer bytes
than DDP and streaming a quarter per sync, and the report is well formed. The full table is
in docs/diloco.md."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

from _smoke import ROOT, smoke_report


def test_diloco_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    report, text = smoke_report("diloco_convergence", tmp_path)
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == ["ddp", "uniform:bits=4@H=5", "dense@H=8,F=4,tau=1"]
    for label, r in rows.items():
        losses = [loss for _, loss in r["curve"]]
        assert all(math.isfinite(x) for x in losses), (label, losses)
        assert losses[-1] < math.log(256), (label, losses)  # below uniform bytes
    ddp_step = 4 * report["params"]
    assert rows["ddp"]["wire_bytes"] == rows["ddp"]["raw_bytes"] == ddp_step * 16
    # 4-bit pseudo-gradients every 5 steps: over 5 x 6 = 30 times fewer bytes than DDP
    assert 30 * rows["uniform:bits=4@H=5"]["wire_bytes"] < rows["ddp"]["wire_bytes"]
    streaming = rows["dense@H=8,F=4,tau=1"]
    assert streaming["probes"]["syncs"] == 8  # 16 steps, a fragment every 2
    assert streaming["probes"]["peak_sync_bytes"] < 0.3 * ddp_step
    assert text.startswith("| run | val loss min / median / max | vs DDP (median) |")
    assert "| dense@H=8,F=4,tau=1 |" in text
    # the table and the loss-per-byte plot again, from the JSON alone
    png, md = tmp_path / "plot.png", tmp_path / "again.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diloco_convergence.py"), "--from-json",
         str(tmp_path / "diloco_convergence.json"), "--plot", str(png), "--markdown", str(md)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.read_text().splitlines()[:5] == text.splitlines()[:5]
