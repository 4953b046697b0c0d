"""Federated convergence on digits (4 label-skewed clients, Dirichlet alpha 0.3): a test-sized run
(one seed) of ``benchmarks/federated_convergence.py``, whose full table (3 seeds) is in
docs/federated.md."""

from __future__ import annotations

import pathlib
import statistics
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))

from federated_convergence import RUNS, run, table

# The benchmark spawns its ranks; in tests they start from the fork server (tests/_spawn.py).
pytestmark = pytest.mark.usefixtures("fast_spawn")

KEEP = (
    "FedAvg H=10, dense",
    "FedAvg H=10, topk 1% + EF",
    "FedAvg H=100, dense",
    "SCAFFOLD H=100, dense",
)
SEEDS = [0]


def test_compressed_fedavg_matches_dense_and_scaffold_reduces_drift() -> None:
    results = run([r for r in RUNS if r.label in KEEP], SEEDS)
    print(table(results))
    acc = {k: statistics.mean(r.accuracy for r in results if r.label == k) for k in KEEP}
    topk = [r for r in results if r.label == "FedAvg H=10, topk 1% + EF"]
    dense = [r for r in results if r.label == "FedAvg H=10, dense"]
    assert acc["FedAvg H=10, dense"] > 90.0
    assert acc["FedAvg H=10, topk 1% + EF"] >= acc["FedAvg H=10, dense"] - 1.0, acc
    for t, d in zip(topk, dense):
        assert d.dense_bytes / t.uplink_bytes >= 20.0
        assert abs(d.uplink_bytes / d.dense_bytes - 1) < 0.01  # dense sends what it says
    # 100 local steps a round on skewed shares drift; SCAFFOLD's variates pull them back.
    assert acc["SCAFFOLD H=100, dense"] >= acc["FedAvg H=100, dense"] + 1.0, acc
