"""The engine's Step: submit groups of tensors, close or abort, on 2 real gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _spawn import init

from commhooks.engine import CompressionState


def _named() -> list[tuple[str, torch.nn.Parameter]]:
    return [
        ("a", torch.nn.Parameter(torch.zeros(64, 40))),
        ("b", torch.nn.Parameter(torch.zeros(30))),
        ("c", torch.nn.Parameter(torch.zeros(50, 50))),
    ]


def _grads(rank: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return [torch.randn(p.shape, generator=g) for _, p in _named()]


def step_worker(rank: int, world: int, store: str, out: str) -> None:
    init(rank, world, store)
    try:
        res: dict[str, Any] = {}
        keys = [n for n, _ in _named()]
        # identity: the means are a dense all-reduce's, in the inputs' shapes and dtypes.
        state = CompressionState("identity", named_parameters=_named(), min_numel=0)
        grads = _grads(rank, 0)
        step = state.begin()
        first = step.submit(keys[:2], grads[:2])
        second = step.submit(keys[2:], [grads[2].double()], last=True)
        report = step.close()
        res["means"] = [*first.value(), *second.value()]
        res["inputs_unchanged"] = all(torch.equal(g, h) for g, h in zip(grads, _grads(rank, 0)))
        res["report"] = (report.raw_bytes, report.wire_bytes, report.nonfinite)
        res["steps"] = state.stats().steps
        res["dense"] = []
        for g in grads:
            t = g.clone()
            dist.all_reduce(t)
            res["dense"].append(t / world)
        # top-k with error feedback: a committed step changes the residuals, an aborted one
        # and a step with an inf on rank 1 leave them as they were.
        state = CompressionState("topk:ratio=0.1", named_parameters=_named(), min_numel=0)
        step = state.begin()
        step.average(keys, _grads(rank, 1))
        report = step.close()
        res["compressed"] = report.wire_bytes < report.raw_bytes
        saved = {k: state.feedback.residual(k).clone() for k in ("a", "c")}
        step = state.begin()
        step.average(keys, _grads(rank, 2))
        step.abort()
        res["abort_kept"] = all(torch.equal(saved[k], state.feedback.residual(k)) for k in saved)
        bad = _grads(rank, 3)
        if rank == 1:
            bad[0][0, 0] = float("inf")
        step = state.begin()
        means = step.average(keys, bad)
        report = step.close()
        res["nonfinite"] = report.nonfinite
        res["mean_nonfinite"] = not bool(torch.isfinite(means[0]).all())
        res["nonfinite_kept"] = all(
            torch.equal(saved[k], state.feedback.residual(k)) for k in saved
        )
        res["nonfinite_steps"] = state.stats().nonfinite_steps
        # A step opened while another is open rolls the first back.
        stale = state.begin()
        stale.average(keys, _grads(rank, 4))
        state.begin().close()
        res["stale_kept"] = all(torch.equal(saved[k], state.feedback.residual(k)) for k in saved)
        res["stale_closed"] = stale.closed
        try:
            stale.submit(keys, _grads(rank, 5))
        except RuntimeError as e:
            res["closed_error"] = str(e)
        try:
            state.begin().submit(keys[:1], _grads(rank, 5))
        except ValueError as e:
            res["keys_error"] = str(e)
        state.abort_step()
        torch.save(res, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: Any) -> list[dict[str, Any]]:
    from _spawn import ranks_runner

    return ranks_runner(tmp_path_factory.mktemp("step"))(step_worker, 2)


def test_means_equal_a_dense_all_reduce(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["inputs_unchanged"]
        assert r["means"][2].dtype == torch.float64
        for got, want in zip(r["means"], r["dense"]):
            torch.testing.assert_close(got.float(), want)
        raw, wire, nonfinite = r["report"]
        assert raw == wire > 0 and not nonfinite
        assert r["steps"] == 1


def test_close_commits_and_compression_happens(results: list[dict[str, Any]]) -> None:
    assert all(r["compressed"] for r in results)


def test_abort_and_overflow_roll_back(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["abort_kept"]
        assert r["nonfinite"] and r["mean_nonfinite"]
        assert r["nonfinite_kept"]
        assert r["nonfinite_steps"] == 1
        assert r["stale_kept"] and r["stale_closed"]


def test_misuse_raises(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "already closed" in r["closed_error"]
        assert "1 keys for 3 tensors" in r["keys_error"]
