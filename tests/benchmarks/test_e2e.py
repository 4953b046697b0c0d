"""Smoke test of ``benchmarks/e2e.py`` (``make bench``): over a shaped 2-rank cluster it runs
and writes a well-formed report (JSON, Markdown, plots).

No timing is asserted: the machine is shared, and the numbers belong in docs/benchmarks.md.
Root only, as the shaped cluster (network namespaces, tc) needs it; CI runs as root.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "e2e.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMOKE_LABELS = [
    "dense", "torch-fp16", "torch-bf16", "torch-powersgd", "topk", "sign", "powersgd",
    "uniform:bits=8",
]  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="the shaped cluster needs root (ip netns, tc)")
def test_e2e_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    res = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ip netns exec chk0" in res.stderr  # the commands are printed
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["runs"] == [
        {"ranks": 2, "link": "100mbit", "error": None, "wall_s": report["runs"][0]["wall_s"]}
    ]
    rows = report["rows"]
    assert sorted({r["model"] for r in rows}) == ["conv", "mlp"]
    for model in ("mlp", "conv"):
        mine = {r["label"]: r for r in rows if r["model"] == model}
        # torch-powersgd (default buckets) comes from a launch of its own, first; the main one
        # runs torch-powersgd-1bucket in its place
        assert next(iter(mine)) == "torch-powersgd"
        assert sorted(mine) == sorted([*SMOKE_LABELS, "torch-powersgd-1bucket"])
        n = report["models"][model]["params"]
        for label, r in mine.items():
            assert (r["ranks"], r["link"]) == (2, "100mbit")
            if r["error"] is not None:  # a hook that failed is a row, not a failed run
                assert label.startswith("torch-"), (model, label, r["error"])
                continue
            assert r["min_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"], label
            assert r["vs_dense"] > 0, label
            assert r["wire_source"] == (
                "analytic" if label.startswith(("dense", "torch-")) else "hook"
            )
            assert r["wire_bytes"] > 0 and r["link_est_bytes"] > 0, label
            # the parent's interface counters over the window: headers and ACKs on top
            assert r["iface_tx_bytes"] > 0 and r["iface_rx_bytes"] > 0, label
            assert r["iface_vs_est"] > 0.9, (label, r["iface_vs_est"])
        assert mine["dense"]["wire_bytes"] == 4 * n
        assert mine["torch-fp16"]["wire_bytes"] == 2 * n
        assert mine["dense"]["vs_dense"] == 1.0
        assert mine["powersgd"]["vs_torch_powersgd"] > 0  # against the one-bucket run
    assert {t["label"] for t in report["tta"]} == {"dense", "topk", "sign"}
    for t in report["tta"]:
        assert t["error"] is None and t["steps"] > 0 and t["curve_acc"], t["label"]
    targets = {t["what"] for t in report["targets"]}
    assert "sign step / dense at 100mbit" in targets
    assert "time to accuracy / dense at 100mbit" in targets

    text = (tmp_path / "e2e.md").read_text()
    assert text.startswith("## Step time / dense")
    assert "| variant | EF | 2 ranks 100mbit |" in text
    assert all(f"| {label} |" in text for label in SMOKE_LABELS)
    assert "## Targets" in text and "## Time to accuracy" in text
    assert "| interface tx MB | interface / est. | target |" in text
    for png in ("step_time.png", "tta.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_e2e_rejects_a_bad_spec_before_building_anything(tmp_path: pathlib.Path) -> None:
    res = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--variants", "topk:ratio=3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert res.returncode == 2 and "ratio=3.0: must be <= 1.0" in res.stderr
    assert "ip netns" not in res.stderr and not (tmp_path / "e2e.json").exists()


def test_e2e_without_root_exits_with_a_clear_message(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert e2e.main(["--smoke", "--out", str(tmp_path / "out")]) == 2
    assert "needs root" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the shaped cluster needs root (ip netns, tc)")
def test_e2e_nodes_rows_compare_flat_and_hierarchical(tmp_path: pathlib.Path) -> None:
    """2 nodes x 2 ranks, tiny model: the node rows, their inter-node bytes and targets."""
    variants = ["dense", "compute-only", "sign+flat", "sign+hier"]
    res = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--ranks", "--no-tta", "--nodes", "2x2",
         "--node-links", "1gbit", "--node-variants", *variants, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert "--nproc_per_node=2" in res.stderr
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["rows"] == []
    rows = {r["label"]: r for r in report["node_rows"]}
    assert sorted(rows) == sorted(variants)
    for r in rows.values():
        assert r["error"] is None and r["ranks"] == 4 and r["per_node"] == 2, r
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
    # Counted on the links between nodes only; the hierarchical exchange sends a piece.
    assert rows["sign+hier"]["iface_tx_bytes"] < rows["sign+flat"]["iface_tx_bytes"]
    assert rows["compute-only"]["iface_tx_bytes"] < 0.1 * rows["sign+flat"]["iface_tx_bytes"]
    whats = {t["what"] for t in report["targets"]}
    assert "inter-node bytes, hierarchical / flat" in whats
    text = (tmp_path / "e2e.md").read_text()
    assert "## Nodes x ranks per node: hierarchical against flat" in text
    assert "| 2x2 | 1gbit | sign |" in text
