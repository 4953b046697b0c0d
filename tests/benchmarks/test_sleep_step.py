"""Smoke test of ``benchmarks/sleep_step.py``: it runs two ranks in network namespaces and
writes a well-formed report. No timings are asserted (the machine is shared)."""

from __future__ import annotations

import os
import pathlib

import pytest
from _smoke import smoke_report


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_sleep_step_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    report, text = smoke_report("sleep_step", tmp_path)
    rows = report["rates"]["unshaped"]
    assert list(rows)[:3] == ["noop", "meet", "dense"]
    assert len(rows) == 3 + len(report["config"]["specs"])
    assert rows["noop"]["vs_noop"]["median"] == 1.0
    assert rows["meet"]["vs_meet"]["median"] == 1.0
    for label, r in rows.items():
        s = r["step_ms"]
        assert 0 < s["min"] <= s["median"] <= s["max"], label
        # the training thread's own CPU: some, and no more than the step's wall time
        assert 0 < r["thread_cpu_ms"]["median"] <= 1.5 * s["max"], label
        if label not in ("noop", "meet", "dense"):
            assert r["wire_bytes"] > 0, label
    assert text.startswith("| link | variant |")
    assert "| vs meet (median) | training thread CPU ms |" in text.splitlines()[0]
