"""Smoke test of ``benchmarks/fsdp_shaped.py``: 2 nodes x 2 ranks in network namespaces, dense
HSDP and one hierarchical compressed run; the report is well formed and the compressed run
sent fewer bytes between the nodes. No timings are asserted (the machine is shared)."""

from __future__ import annotations

import os
import pathlib

import pytest
from _smoke import smoke_report


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_fsdp_shaped_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    report, text = smoke_report("fsdp_shaped", tmp_path)
    rows = report["rows"]
    assert list(rows) == ["dense", *report["config"]["specs"]]
    dense, (quant,) = rows["dense"], [r for k, r in rows.items() if k != "dense"]
    assert dense["feedback_bytes"] == 0 and quant["feedback_bytes"] > 0
    # error feedback of this rank's shard: at most the fp32 model over 2 ranks per node
    assert quant["feedback_bytes"] <= quant["model_bytes"] / 2
    assert 0 < quant["tx_bytes_per_rank_step"] < dense["tx_bytes_per_rank_step"]
    assert all(len(r["step_s"]) == 1 for r in rows.values())
    assert text.startswith("| link | run |")
