"""Smoke test of ``benchmarks/diloco_link.py``: two ranks in network namespaces train DDP,
no communication, the per-step hook and streaming rounds towards DDP's final loss, and the
report is well formed. No timings are asserted (the machine is shared)."""

from __future__ import annotations

import math
import os
import pathlib

import pytest
from _smoke import smoke_report


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_diloco_link_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    report, text = smoke_report("diloco_link", tmp_path)
    rows = report["rates"]["unshaped"]
    assert list(rows) == ["ddp", "noop", "ddp:uniform:bits=4", "uniform:bits=4@H=4,F=2,tau=1"]
    assert rows["ddp"]["vs_ddp_time"]["median"] == 1.0
    assert rows["noop"]["step_vs_noop"]["median"] == 1.0
    assert rows["noop"]["wire_bytes"] == 0
    params = report["runs"]["unshaped"][0]
    assert params["label"] == "ddp" and params["steps"] == report["config"]["steps"]
    ddp_bytes = rows["ddp"]["wire_bytes"]
    for label, r in rows.items():
        assert all(math.isfinite(x) and x < math.log(256) for x in r["val_loss"]), label
        t = r["tokens_per_s"]
        assert 0 < t["min"] <= t["median"] <= t["max"], label
        if label not in ("ddp", "noop"):
            assert 0 < r["wire_bytes"] < ddp_bytes * 2, label  # up to twice DDP's steps
    for run in report["runs"]["unshaped"][1:]:  # stopped at DDP's loss, or ran the horizon
        assert run["reached"] is not None or run["steps"] == 2 * report["config"]["steps"]
    assert text.startswith("| link | run | s to DDP's loss |")
