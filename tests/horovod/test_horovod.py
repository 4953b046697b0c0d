"""commhooks.horovod under real launchers: horovodrun --gloo, horovodrun --mpi and mpirun.

One launch per launcher runs every scenario of ``_hvd_worker.py``; the tests check what the
ranks recorded.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest
import torch

import commhooks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from _launch import launch

WORKER = pathlib.Path(__file__).with_name("_hvd_worker.py")
LAUNCHERS = ["gloo", "mpi", "mpirun"]


@pytest.fixture(scope="module", params=LAUNCHERS)
def ranks(request: Any, tmp_path_factory: Any) -> list[dict]:
    return launch(request.param, WORKER, tmp_path_factory.mktemp(request.param))


def test_two_ranks_started(ranks: list[dict]) -> None:
    assert [r["size"] for r in ranks] == [2, 2]


def test_every_compressor_trains_with_identical_replicas(ranks: list[dict]) -> None:
    runs = ranks[0]["every_compressor"]
    assert set(commhooks.available()) <= set(runs)
    for label, r in runs.items():
        assert r["equal"], f"{label}: replicas differ across ranks"
        assert r["finite"], label
        assert r["isinstance_sgd"], label
        assert r["steps"] == ranks[0]["steps_per_run"], label
        if not label.startswith("identity"):
            assert r["ratio"] > 1.2, f"{label}: ratio {r['ratio']}"
    assert runs["uniform transport=reducescatter"]["transport"] == "reducescatter"
    assert runs["topk"]["transport"] == "allgather"
    assert runs["powersgd"]["transport"] == "allreduce"
    # Both ranks saw the same final losses for the same compressor only if data agree, which
    # they do not (per-rank batches); their stats, though, must match in size.
    for label in runs:
        assert ranks[1]["every_compressor"][label]["equal"]


def test_lossless_settings_equal_horovods_none(ranks: list[dict]) -> None:
    for label, diff in ranks[0]["lossless"].items():
        torch.testing.assert_close(diff, 0.0, msg=label)


def test_adapters_equal_horovods_own(ranks: list[dict]) -> None:
    a = ranks[0]["adapters"]
    for label in ("fp16", "none", "randomk:ratio=1.0"):
        assert a[label] == 0.0, label
    assert a["randomk:ratio=0.25"]["equal"] and a["randomk:ratio=0.25"]["finite"]


def test_error_feedback_state_round_trips(ranks: list[dict]) -> None:
    for r in ranks:
        c = r["checkpoint"]
        assert c["resumed_equal"] and c["has_feedback"]
        assert c["iteration"] == r["steps_per_run"]


def test_synchronize_zero_grad_and_broadcast(ranks: list[dict]) -> None:
    for r in ranks:
        api = r["api"]
        assert api["skip_synchronize_equal"]
        assert "zero_grad() was called after loss.backward()" in api["zero_grad_error"]
        assert api["broadcast_equal"] and api["broadcast_iteration"] == 0
        for field, message in api["bad"].items():
            assert message.startswith(field) or f"{field}=" in message, (field, message)


def test_mismatched_config_raises_on_every_rank(ranks: list[dict]) -> None:
    for r in ranks:
        assert "ranks disagree on the compressor" in r["mismatch"]


def test_exchanges_start_during_backward_and_match_horovod(ranks: list[dict]) -> None:
    for r in ranks:
        o = r["overlap"]
        assert o["buckets"] > 1 and o["started"] == o["buckets"] and o["pending"], o
        assert o["diff"] == 0.0


def test_compression_keyword_takes_specs_and_horovods_members(ranks: list[dict]) -> None:
    for r in ranks:
        c = r["conventions"]
        assert c["topk:ratio=0.01"]["spec"] == "topk" and c["topk:ratio=0.01"]["ratio"] > 10
        assert c["hvd.Compression.fp16"]["spec"] == "fp16"
        assert 1.5 < c["hvd.Compression.fp16"]["ratio"] <= 2.0  # small tensors go dense
        assert c["hvd.Compression.none"]["spec"] == "identity"
        assert all(v["equal"] for k, v in c.items() if k != "both")
        assert c["both"].startswith("compression=") and "not both" in c["both"]


def test_a_nan_in_one_bucket_of_a_mixed_dtype_model_leaves_feedback_alone(
    ranks: list[dict],
) -> None:
    """The float32 and float64 buckets exchanged before the one holding the NaN had changed
    their residuals; the step is one transaction, so those changes are undone."""
    for r in ranks:
        res = r["nan_step"]
        assert res["buckets"] > 2
        assert res["finite"] == [True, True, False, True, True]
        assert res["ef"][2] == res["ef"][1]
        assert res["ef"][3] != res["ef"][2]
        assert res["nonfinite_steps"] == 1
        assert res["equal"]


def test_update_compression_keeps_replicas_identical(ranks: list[dict]) -> None:
    for r in ranks:
        u = r["updates"]
        assert u["equal"] and u["finite"] and u["is_adamw"], u
        assert u["steps"] == r["steps_per_run"] and u["ratio"] > 2, u  # (fresh targets: no trend)
        t = r["updates_topk"]  # sparsifiers warm their sparsity up by default, as under DDP
        assert t["equal"] and t["finite"] and list(t["warmup"]) == [30, 0.5], t
        # DGC's schedule, 0.5 falling exponentially to 1% over 30 steps, after this many
        want = 0.5 * (0.01 / 0.5) ** (r["steps_per_run"] / 30)
        assert t["ratio_now"] == pytest.approx(want, rel=1e-6), t
