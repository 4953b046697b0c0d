"""A tiny run of ``benchmarks/transformer_convergence.py`` (AdamW on a byte-level transformer,
2 gloo ranks): it completes, the losses are finite and fall, the compressed runs send fewer
bytes than they were handed, and the tables are well formed. The full table is in
docs/convergence.md."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))

from transformer_convergence import Config, probe_table, run, table

# The benchmark spawns its ranks; in tests they start from the fork server (tests/_spawn.py).
pytestmark = pytest.mark.usefixtures("fast_spawn")

LABELS = ["dense", "sign", "sign@updates=True"]


def test_tiny_transformer_run_trains_and_compresses() -> None:
    cfg = Config(steps=30, warmup=5, eval_every=10, eval_batches=2, probe_every=10)
    results = {r.label: r for r in run(LABELS, [0], cfg)}
    assert list(results) == LABELS
    for label, r in results.items():
        losses = [loss for _, loss in r.curve]
        assert [s for s, _ in r.curve] == [10, 20, 30], label
        assert all(math.isfinite(x) for x in losses), (label, losses)
        assert losses[-1] < losses[0] < math.log(256), (label, losses)  # below uniform bytes
    assert results["dense"].wire_bytes == results["dense"].raw_bytes
    for label in ("sign", "sign@updates=True"):
        assert 0 < 10 * results[label].wire_bytes < results[label].raw_bytes, label
    # the probes: the dense run's average is the dense average; sign's is not
    assert results["dense"].probes["rel_err_big"] < 1e-5
    assert results["sign"].probes["rel_err_big"] > 0.1
    md = table(list(results.values()))
    assert md.startswith("| run | val loss min / median / max |")
    assert all(f"| {label} |" in md for label in LABELS)
    assert "| sign | " in probe_table(list(results.values()))
