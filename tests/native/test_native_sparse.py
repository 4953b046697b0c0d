"""The sparsifiers' native selection (top-k, threshold, DGC) against their torch paths: the same
payload and error-feedback residual, and the torch path's handling of non-finite input."""

from __future__ import annotations

import pytest
import torch

import commhooks
from commhooks import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")

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
    payload, ctx = c.compress_feedback(g, e)
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
    assert ef.compressor.compress_feedback(x, e, "w") is None  # the kernel refuses
    assert torch.equal(e, before)  # having written nothing
    payload, _ = ef.compress("w", x)
    assert not bool(torch.isfinite(payload[0]).all())  # GradScaler will see it
    assert torch.equal(ef.residual("w"), before)
