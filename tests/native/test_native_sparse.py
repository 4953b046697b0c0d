"""The sparsifiers' native selection (top-k, threshold, DGC) against their torch paths: the same
payload and error-feedback residual, and the torch path's handling of non-finite input."""

from __future__ import annotations

import pytest
import torch

import commhooks
from commhooks import native
from commhooks.feedback import fused_compress

SIZES = [native.MIN_NUMEL, 100_003, 300_007]  # the last is split across threads


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.logspace(-2, 1, n)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 3.0, float("inf")])
@pytest.mark.parametrize("with_e", [False, True])
def test_select_at_least_is_torchs_selection(threshold, with_e):
    g = _data(300_007, 0)
    e = _data(300_007, 1) * 0.1 if with_e else None
    c = g + e if with_e else g
    idx, val, finite = native.select_at_least(g, e, threshold)
    expect = (~(c.abs() < threshold)).nonzero().squeeze(1)
    assert torch.equal(idx, expect)  # ascending, as nonzero gives them
    assert torch.equal(val, c[expect])
    assert finite


def test_select_at_least_collects_and_flags_non_finite():
    g = _data(100_003, 2)
    g[[5, 70_000]] = torch.tensor([float("nan"), float("-inf")])
    idx, _, finite = native.select_at_least(g, None, 2.0)
    assert not finite
    assert {5, 70_000} <= set(idx.tolist())  # NaN is collected, as the torch path does


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.2])
def test_compress_matches_the_torch_path(n, ratio, monkeypatch):
    x = _data(n, 3)
    fast, ctx = commhooks.compressor(f"topk:ratio={ratio}").compress(x)
    with monkeypatch.context() as m:
        m.setenv("COMMHOOKS_NATIVE", "0")
        slow, _ = commhooks.compressor(f"topk:ratio={ratio}").compress(x)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    kept = commhooks.compressor("topk").decompress(fast, ctx)
    exact = x.abs().topk(fast[0].numel()).indices.sort().values
    assert torch.equal(kept.nonzero().squeeze(1), exact)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(
    "spec", ["threshold:threshold=1.5", "dgc:ratio=0.01", "dgc:ratio=0.01,max_excess=1.0"]
)
def test_threshold_and_dgc_match_the_torch_path(spec, n, monkeypatch):
    x = _data(n, 8)
    fast, _ = commhooks.compressor(spec).compress(x)
    with monkeypatch.context() as m:
        m.setenv("COMMHOOKS_NATIVE", "0")
        slow, _ = commhooks.compressor(spec).compress(x)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize(
    "spec",
    [
        "topk:ratio=0.01",
        "topk:ratio=0.001,index_coding=delta",
        "threshold:threshold=2.0",
        "dgc:ratio=0.01",
    ],
)
def test_error_feedback_same_with_and_without_kernels(spec, monkeypatch):
    fast = commhooks.ErrorFeedback(spec)
    got = [fast.compress("w", _data(300_007, s))[0] for s in range(4)]
    with monkeypatch.context() as m:
        m.setenv("COMMHOOKS_NATIVE", "0")
        slow = commhooks.ErrorFeedback(spec)
        ref = [slow.compress("w", _data(300_007, s))[0] for s in range(4)]
    for a, b in zip(got, ref):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(fast.residual("w"), slow.residual("w"))


def test_fused_residual_is_c_with_the_sent_elements_cleared():
    g, e0 = _data(300_007, 4), _data(300_007, 5) * 0.3
    c = commhooks.compressor("topk:ratio=0.01")
    e = e0.clone()
    payload, ctx = fused_compress(c, g, e)
    sent = c.decompress(payload, ctx)
    assert torch.equal(e, torch.where(sent != 0, 0.0, g + e0))
    assert torch.equal(sent[sent != 0], (g + e0)[sent != 0])


def test_ties_keep_exactly_k():
    x = torch.ones(100_000)
    x[::3] = 2.0  # 33,334 of the larger magnitude, far more ties than k
    x[7] = 5.0
    payload, _ = commhooks.compressor("topk:ratio=0.01").compress(x)
    values = payload[0]
    assert values.numel() == 1000
    assert float(values.max()) == 5.0 and bool((values == 2.0).sum() == 999)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_reaches_the_wire_and_keeps_the_residual(bad):
    ef = commhooks.ErrorFeedback("topk:ratio=0.01")
    ef.compress("w", _data(100_003, 6))
    before = ef.residual("w").clone()
    x = _data(100_003, 7)
    x[11] = bad
    e = before.clone()
    assert fused_compress(ef.compressor, x, e, "w") is None  # the kernel refuses
    assert torch.equal(e, before)  # having written nothing
    payload, _ = ef.compress("w", x)
    assert not bool(torch.isfinite(payload[0]).all())  # GradScaler will see it
    assert torch.equal(ef.residual("w"), before)


# -- random-k's fused error-feedback exchange (all-reduce) --------------------------------


def _rk_run(efs, grads):
    from commhooks.testing import simulate_allreduce

    exchanges = [ef.exchange(["a", "b"], g, len(efs)) for ef, g in zip(efs, grads)]
    simulate_allreduce(exchanges)
    return exchanges, [ex.result() for ex in exchanges], [ex.local() for ex in exchanges]


def _rk_grads(world: int, step: int) -> list[list[torch.Tensor]]:
    return [[_data(n, 10 * step + r + n % 7) for n in (100_003, 300_007)] for r in range(world)]


@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("bad", [None, float("nan"), 1e30])
def test_randomk_fused_exchange_matches_op_by_op(decay, bad, monkeypatch):
    """The same values, results, locals and residuals as the op-by-op exchange; a NaN is sent
    on (poisoned values) with the residual kept; huge finite values go op by op."""
    from commhooks.compressors.randomk import FusedRandomKExchange

    world = 3
    fused = [commhooks.ErrorFeedback("randomk:ratio=0.05", decay=decay) for _ in range(world)]
    plain = [commhooks.ErrorFeedback("randomk:ratio=0.05", decay=decay) for _ in range(world)]
    for step in range(3):
        grads = _rk_grads(world, step)
        if step == 2 and bad is not None:
            grads[1][0][77] = bad
        exchanges, results, locals_ = _rk_run(fused, grads)
        # Each rank decides alone (the messages have the same layout either way): rank 1,
        # holding the huge value, goes op by op.
        fused_type = isinstance(exchanges[1], FusedRandomKExchange)
        assert fused_type == (step > 0 and not (step == 2 and bad == 1e30))
        with monkeypatch.context() as m:
            m.setenv("COMMHOOKS_NATIVE", "0")
            _, want_results, want_locals = _rk_run(plain, grads)
        for got, want in ((results, want_results), (locals_, want_locals)):
            for xs, ys in zip(got, want):
                for x, y in zip(xs, ys):
                    torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        for ef_f, ef_p in zip(fused, plain):
            for k in ("a", "b"):
                assert torch.equal(ef_f.residual(k), ef_p.residual(k))


def test_randomk_fused_result_into_and_abandon():
    from commhooks.compressors.randomk import FusedRandomKExchange
    from commhooks.testing import simulate_allreduce

    world = 2
    solo = [commhooks.ErrorFeedback("randomk")]
    _rk_run(solo, _rk_grads(1, 0))
    before = solo[0].residual("a").clone()
    abandoned = solo[0].exchange(["a", "b"], _rk_grads(1, 1)[0], 1)
    assert isinstance(abandoned, FusedRandomKExchange)
    abandoned.abandon()
    assert torch.equal(solo[0].residual("a"), before)
    efs = [commhooks.ErrorFeedback("randomk") for _ in range(world)]
    _rk_run(efs, _rk_grads(world, 0))
    twins = [commhooks.ErrorFeedback("randomk") for _ in range(world)]
    _rk_run(twins, _rk_grads(world, 0))
    grads = _rk_grads(world, 2)
    _, want, _ = _rk_run(twins, [[g.clone() for g in gs] for gs in grads])
    exchanges = [ef.exchange(["a", "b"], g, world) for ef, g in zip(efs, grads)]
    simulate_allreduce(exchanges)
    exchanges[0].result_into(grads[0], world)  # into the inputs themselves
    for got, w in zip(grads[0], want[0]):
        torch.testing.assert_close(got, w / world, rtol=0, atol=0)
