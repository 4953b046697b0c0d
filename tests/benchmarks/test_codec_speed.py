"""Smoke test of ``benchmarks/codec_speed.py`` (``make bench-kernels``): it runs and writes a
well-formed report. No timing is asserted; the numbers belong in docs/benchmarks.md."""

from __future__ import annotations

import pathlib

from _smoke import smoke_report


def test_kernels_smoke_writes_report(tmp_path: pathlib.Path) -> None:
    report, text = smoke_report("codec_speed", tmp_path)
    rows = report["rows"]
    specs = sorted({r["spec"] for r in rows})
    assert specs == sorted(["topk:ratio=0.01", "sign", "uniform:bits=8", "powersgd:rank=2"])
    assert sorted((r["spec"], r["error_feedback"]) for r in rows) == sorted(
        (s, ef) for s in specs for ef in (False, True)
    )
    for r in rows:
        assert r["eta_min"] <= r["eta_median"] <= r["eta_max"] and r["eta_min"] > 0
        assert r["compress_ms"] > 0 and r["decompress_ms"] >= 0
    assert [t["ratio"] for t in report["topk"]] == [0.001, 0.01]
    for t in report["topk"]:
        assert 0.9 <= t["energy"] <= 1.0 + 1e-9 and t["speedup_median"] > 0
    assert "| numel | compressor | EF |" in text and "torch.topk(sorted=False)" in text
