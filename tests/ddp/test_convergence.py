"""Convergence on real data (scikit-learn's digits, non-IID ranks): a test-sized run of
``benchmarks/ddp_convergence.py`` (2 ranks of 128 samples a step, lr 0.1: half the steps an
epoch), whose full table (4 ranks of 32, 3 seeds, every compressor) is in ``docs/ddp.md``."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))

from ddp_convergence import RUNS, run, table

# The benchmark spawns its ranks; in tests they start from the fork server (tests/_spawn.py).
pytestmark = pytest.mark.usefixtures("fast_spawn")

KEEP = ("dense", "topk", "topk, no EF", "sign", "powersgd", "uniform")


def test_error_feedback_reaches_dense_accuracy_and_its_absence_shows() -> None:
    runs = [r for r in RUNS if r.label in KEEP]
    results = {r.label: r for r in run(runs, seeds=[0], epochs=40, world=2, batch=128, lr=0.1)}
    print(table(list(results.values())))
    dense = results["dense"].accuracy
    assert dense > 94.0
    for label in ("topk", "sign", "powersgd", "uniform"):
        assert results[label].accuracy >= dense - 1.0, (label, results[label], dense)
        assert results[label].ratio > 3.5, (label, results[label])
    # The control: the same top-k without error feedback is measurably worse.
    assert results["topk, no EF"].accuracy <= results["topk"].accuracy - 1.5
