"""Every fused error-feedback path against the op-by-op reference (``fused=False``).

The fused paths are those registered in :mod:`commhooks.feedback` by (codec, device): the
kernels' fused encodes (native quantizers and sparsifiers) and the fused exchanges (casts,
random-k, PowerSGD, shared-scale uniform); tests/comm/test_fused_memories.py runs them
through the reduce-scatter server memories. Each runs the same sequence of steps as the
reference: normal steps, a step with a non-finite value, an abandoned exchange, a step rolled
back by the transaction, and steps after a checkpoint round trip. Payloads, results and
residuals must agree bit for bit, except where a path says it rounds differently (PowerSGD's
fused products).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import commhooks
from commhooks import ErrorFeedback
from commhooks.testing import simulate_allreduce

#: large enough for the native kernels (16K elements and more), plus a small matrix
SHAPES = [(160, 128), (64, 32)]
#: PowerSGD's fused exchange forms g Q + e Q where the reference forms (g + e) Q
ROUNDS_DIFFERENTLY = {"powersgd"}
#: the shared-scale quantizer's fused exchange, with a chunk that leaves a short last one
SHARED_SCALE = ["uniform:bits=8,shared_scale=true", "uniform:bits=4,shared_scale=true,chunk=100"]
SUMMABLE = [
    *(n for n in commhooks.available() if commhooks.compressor(n).capabilities.summable),
    *SHARED_SCALE,
]


def _grads(step: int, rank: int = 0, bad: float | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    out = [torch.randn(s, generator=gen) for s in SHAPES]
    if bad is not None:
        out[0][3, 5] = bad
    return out


def _same(a: Any, b: Any, spec: str, what: str) -> None:
    if spec in ROUNDS_DIFFERENTLY:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{spec}: {what}")
    else:
        assert torch.equal(a, b), f"{spec}: {what} differs from the op-by-op reference"


def _residuals(ef: ErrorFeedback) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ef.state_dict()["residuals"].items()}


def _compare_memory(fused: ErrorFeedback, ref: ErrorFeedback, spec: str, when: str) -> None:
    a, b = _residuals(fused), _residuals(ref)
    assert a.keys() == b.keys(), f"{spec}: residual keys after {when}"
    for k in a:
        _same(a[k], b[k], spec, f"residual {k} after {when}")


@pytest.mark.parametrize("spec", commhooks.available())
def test_compress_paths_equal_the_reference(spec: str) -> None:
    """All-gather side: ``compress`` with fused kernels against op by op."""
    efs = {f: ErrorFeedback(spec, fused=f) for f in (True, False)}
    keys = ["w", "v"]
    plan: list[tuple[str, float | None]] = [
        ("normal", None),
        ("normal", None),
        ("non-finite", float("nan")),
        ("rolled back", None),
        ("normal", None),
    ]
    for step, (kind, bad) in enumerate(plan):
        before = {f: _residuals(ef) for f, ef in efs.items()}
        if kind == "rolled back":
            for ef in efs.values():
                ef.journal(True)
        for key, g in zip(keys, _grads(step, bad=bad)):
            outs = {}
            for f, ef in efs.items():
                payload, ctx = ef.compress(key, g.clone())
                outs[f] = ef.compressor.decompress(payload, ctx)
            if kind != "non-finite":
                _same(outs[True], outs[False], spec, f"step {step} {key} decoded payload")
        for f, ef in efs.items():
            ef.rollback() if kind == "rolled back" else ef.commit_step()
            if kind == "rolled back":
                after = _residuals(ef)
                assert after.keys() == before[f].keys()
                assert all(torch.equal(after[k], before[f][k]) for k in after), (spec, f)
        _compare_memory(efs[True], efs[False], spec, f"step {step} ({kind})")
    # Resumed from a checkpoint, both go on alike.
    resumed = {f: ErrorFeedback(spec, fused=f) for f in (True, False)}
    for f in resumed:
        resumed[f].load_state_dict(efs[f].state_dict())
    for key, g in zip(keys, _grads(9)):
        outs = {}
        for f, ef in resumed.items():
            payload, ctx = ef.compress(key, g.clone())
            outs[f] = ef.compressor.decompress(payload, ctx)
        _same(outs[True], outs[False], spec, f"resumed {key}")
    _compare_memory(resumed[True], resumed[False], spec, "resume")


@pytest.mark.parametrize("spec", SUMMABLE)
def test_exchange_paths_equal_the_reference(spec: str) -> None:
    """All-reduce side: ``exchange`` on 2 simulated ranks, fused against op by op."""
    world, keys = 2, ["w", "v"]
    efs = {f: [ErrorFeedback(spec, fused=f) for _ in range(world)] for f in (True, False)}
    plan = ["normal", "normal", "abandoned", "rolled back", "normal"]
    for step, kind in enumerate(plan):
        results = {}
        for f, ranks in efs.items():
            if kind == "rolled back":
                for ef in ranks:
                    ef.journal(True)
            exchanges = [ef.exchange(keys, _grads(step, r), world) for r, ef in enumerate(ranks)]
            if kind == "abandoned":
                # Some rank overflowed: the engine abandons the exchange and rolls the step back.
                for ex, ef in zip(exchanges, ranks):
                    ex.abandon()
                    ef.rollback()
                continue
            simulate_allreduce(exchanges)
            results[f] = [ex.result() for ex in exchanges]
            for ef in ranks:
                ef.rollback() if kind == "rolled back" else ef.commit_step()
        if kind != "abandoned":
            for r in range(world):
                for i, key in enumerate(keys):
                    _same(results[True][r][i], results[False][r][i], spec, f"step {step} {key}")
        for r in range(world):
            _compare_memory(efs[True][r], efs[False][r], spec, f"step {step} ({kind}), rank {r}")


@pytest.mark.parametrize("spec", SUMMABLE)
def test_a_non_finite_exchange_keeps_the_memory_as_the_reference_does(spec: str) -> None:
    world, keys = 2, ["w", "v"]
    efs = {f: [ErrorFeedback(spec, fused=f) for _ in range(world)] for f in (True, False)}
    for step in range(3):
        for ranks in efs.values():
            bad = float("inf") if step == 1 else None
            exchanges = [
                ef.exchange(keys, _grads(step, r, bad=bad if r == 1 else None), world)
                for r, ef in enumerate(ranks)
            ]
            simulate_allreduce(exchanges)
            for ex in exchanges:
                ex.result()
        for r in range(world):
            _compare_memory(efs[True][r], efs[False][r], spec, f"step {step}, rank {r}")
