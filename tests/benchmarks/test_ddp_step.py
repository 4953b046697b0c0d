"""Smoke test of ``benchmarks/ddp_step.py``: it runs and writes a well-formed report.

No timings are asserted; the machine is shared and the numbers belong in docs/ddp.md.
"""

from __future__ import annotations

import pathlib
import sys

from _smoke import ROOT, smoke_report


def test_ddp_step_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    report, text = smoke_report("ddp_step", tmp_path)
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["allreduce", "torch-fp16", "topk", "sign", "powersgd"]
    n = report["n_params"]
    assert rows["allreduce"]["wire_bytes_per_step"] == 4 * n
    assert rows["torch-fp16"]["wire_bytes_per_step"] == 2 * n
    for label in ("topk", "sign", "powersgd"):
        r = rows[label]
        assert 0 < r["wire_bytes_per_step"] < 4 * n, label
        assert r["ratio"] > 1.0, label
        assert r["min_s"] <= r["median_s"] <= r["max_s"], label
    assert rows["allreduce"]["vs_allreduce"] == 1.0
    assert text.startswith("| variant |")
    assert all(f"| {label} |" in text for label in rows)


def test_variant_labels_carry_hook_options() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _report import parse_variant

    assert parse_variant("sign") == ("sign", {})
    assert parse_variant("topk:ratio=0.01@coalesce=True,start_iter=2") == (
        "topk:ratio=0.01",
        {"coalesce": True, "start_iter": 2},
    )
