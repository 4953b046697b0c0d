"""Random-k: shared indices, exact count, unbiasedness, summability."""

from __future__ import annotations

import pytest
import torch

import commhooks
from commhooks.testing import simulate_allreduce


def test_every_rank_draws_the_same_indices_in_any_order() -> None:
    a, b = commhooks.compressor("randomk:ratio=0.1"), commhooks.compressor("randomk:ratio=0.1")
    x = torch.randn(1000)
    _, ca_w = a.compress(x, "w")
    _, ca_b = a.compress(x[:100], "b")
    _, cb_b = b.compress(x[:100], "b")  # other order on rank b
    _, cb_w = b.compress(x, "w")
    assert torch.equal(ca_w.extra, cb_w.extra) and torch.equal(ca_b.extra, cb_b.extra)
    # A second call draws fresh indices, still in agreement.
    _, ca2 = a.compress(x, "w")
    _, cb2 = b.compress(x, "w")
    assert torch.equal(ca2.extra, cb2.extra) and not torch.equal(ca2.extra, ca_w.extra)


@pytest.mark.parametrize("n,ratio", [(1000, 0.01), (1001, 0.3), (10, 1.0), (5, 0.01)])
def test_exactly_k_unique_sorted_indices(n: int, ratio: float) -> None:
    c = commhooks.compressor(f"randomk:ratio={ratio}")
    payload, ctx = c.compress(torch.randn(n), "w")
    k = max(1, min(n, round(ratio * n)))
    idx = ctx.extra
    assert idx.numel() == k == payload[0].numel()
    assert torch.equal(idx.unique(), idx) and int(idx.max()) < n
    assert c.nbytes(payload) == 4 * k  # no index bytes on the wire


def test_unbiased_mode_is_unbiased() -> None:
    n, ratio, trials = 64, 0.125, 4000
    x = torch.linspace(-1, 1, n)
    c = commhooks.compressor(f"randomk:ratio={ratio},unbiased=true")
    samples = torch.stack([c.decompress(*c.compress(x, "w")) for _ in range(trials)])
    # Each element is kept with p = ratio and scaled by 1/p: variance x^2 (1/p - 1).
    stderr = (x.square() * (1 / ratio - 1) / trials).sqrt()
    assert ((samples.mean(0) - x).abs() <= 5 * stderr + 1e-6).all()


def test_all_reduce_of_values_is_the_sum_on_shared_indices() -> None:
    ranks = [commhooks.compressor("randomk:ratio=0.2") for _ in range(3)]
    xs = [torch.randn(50) for _ in range(3)]
    exchanges = [c.exchange([x], ["w"], 3) for c, x in zip(ranks, xs)]
    simulate_allreduce(exchanges)
    idx = exchanges[0]._ctxs[0].extra
    expected = torch.zeros(50)
    expected[idx] = sum(x[idx] for x in xs)
    torch.testing.assert_close(exchanges[0].result()[0], expected)


def test_bad_ratio_names_the_field() -> None:
    with pytest.raises(ValueError, match="ratio"):
        commhooks.compressor("randomk:ratio=2")
    with pytest.raises(ValueError, match="unbiased"):
        commhooks.compressor("randomk:unbiased=maybe")


def test_large_finite_half_values_stay_finite() -> None:
    """Every value finite but their fp16 sum overflows: the NaN probe must not fire."""
    g = torch.full((4096,), 4.0e4, dtype=torch.float16)
    payload, _ = commhooks.compressor("randomk:ratio=0.1").compress(g, "w")
    assert torch.isfinite(payload[0]).all()
    bad = g.clone()
    bad[7] = float("nan")
    payload, _ = commhooks.compressor("randomk:ratio=0.1").compress(bad, "w")
    assert not torch.isfinite(payload[0]).all()
