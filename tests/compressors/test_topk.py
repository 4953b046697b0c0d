"""Top-k: exact selection, the sampled fast path, index coding sizes, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.coding.indices import index_nbytes
from commhooks.compressors.topk import TopK, TopKConfig


def kept(c: TopK, x: torch.Tensor) -> torch.Tensor:
    y = c.decompress(*c.compress(x))
    return (y != 0).nonzero().squeeze(1)


@pytest.mark.parametrize("n,ratio", [(1000, 0.01), (4097, 0.1), (50, 0.5), (7, 1.0)])
def test_exact_keeps_the_k_largest_magnitudes(n: int, ratio: float) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    c = TopK(TopKConfig(ratio=ratio, mode="exact"))
    k = max(1, round(ratio * n))
    expected = x.abs().topk(k).indices.sort().values
    assert torch.equal(kept(c, x), expected)


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05])
def test_approx_count_and_energy_against_exact(ratio: float) -> None:
    gen = torch.Generator().manual_seed(7)
    # Heavy-tailed, as gradients are: a Student-t-like mix.
    x = torch.randn(400_000, generator=gen) * torch.rand(400_000, generator=gen) ** 3
    k = round(ratio * x.numel())
    approx = commhooks.compressor(f"topk:ratio={ratio}")
    exact = commhooks.compressor(f"topk:ratio={ratio},mode=exact")
    ya = approx.decompress(*approx.compress(x))
    ye = exact.decompress(*exact.compress(x))
    count = int((ya != 0).sum())
    assert abs(count - k) <= 0.1 * k
    assert ya.square().sum() >= 0.98 * ye.square().sum()


def test_values_are_sent_unchanged_in_the_input_dtype() -> None:
    x = torch.randn(3000, dtype=torch.float16)
    payload, _ = commhooks.compressor("topk:ratio=0.01").compress(x)
    assert payload[0].dtype == torch.float16 and payload[0].numel() == 30
    idx = kept(commhooks.compressor("topk:ratio=0.01"), x)
    assert torch.equal(payload[0], x[idx])


@pytest.mark.parametrize("coding", ["auto", "fixed", "bitmap", "delta", "smallest"])
def test_payload_bytes_are_exact(coding: str) -> None:
    n, ratio = 100_000, 0.01
    c = commhooks.compressor(f"topk:ratio={ratio},index_coding={coding}")
    payload, _ = c.compress(torch.randn(n))
    values, code = payload
    assert values.numel() * 4 + code.numel() == c.nbytes(payload)
    static = index_nbytes(1000, n, coding)
    if static is not None:
        assert code.numel() == static
    assert c.capabilities.static_size == (static is not None)


def test_nan_is_selected_not_dropped() -> None:
    x = torch.randn(10_000)
    x[1234] = float("nan")
    for mode in ("approx", "exact"):
        y = commhooks.compressor(f"topk:ratio=0.001,mode={mode}").decompress(
            *commhooks.compressor(f"topk:ratio=0.001,mode={mode}").compress(x)
        )
        assert torch.isnan(y[1234])


@settings(max_examples=40)
@given(
    n=st.integers(1, 3000),
    ratio=st.floats(0.0005, 1.0),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_approx_keeps_exactly_the_k_largest(n: int, ratio: float, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, min(n, round(ratio * n)))
    idx = kept(commhooks.compressor(f"topk:ratio={ratio}"), x)
    assert idx.numel() == k
    assert x[idx].abs().min() >= x.abs().topk(k).values.min()


@pytest.mark.parametrize(
    "spec,field",
    [
        ("topk:ratio=0", "ratio"),
        ("topk:ratio=-0.1", "ratio"),
        ("topk:ratio=1.5", "ratio"),
        ("topk:mode=fast", "mode"),
        ("topk:sample=0", "sample"),
        ("topk:index_coding=zip", "index_coding"),
        ("topk:ratio=abc", "ratio"),
    ],
)
def test_bad_config_names_the_field(spec: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        commhooks.compressor(spec)


def test_sum_of_fp16_payloads_does_not_overflow() -> None:
    """Three ranks of 60000 sum to 180000, past fp16's 65504; the sum stays in fp32."""
    c = commhooks.compressor("topk:ratio=0.5")
    x = torch.full((64,), 60000.0, dtype=torch.float16)
    compressed = [c.compress(x) for _ in range(3)]
    total = c.aggregate([p for p, _ in compressed], compressed[0][1])
    assert total.dtype == torch.float32
    assert torch.isfinite(total).all() and float(total.max()) == 180000.0


def _on_device_kept(c: TopK, x: torch.Tensor) -> torch.Tensor:
    from commhooks.feedback import decided_on_device

    with decided_on_device():
        payload, ctx = c.compress(x)
        y = c.decompress(payload, ctx)
    assert payload[0].numel() == max(1, round(c.config.ratio * x.numel()))
    return (y != 0).nonzero().squeeze(1)


@pytest.mark.parametrize("seed", range(5))
def test_selection_on_the_device_keeps_the_k_largest(seed: int) -> None:
    # Within a step decided on the device nothing is read back; the set is still the top k.
    x = torch.randn(60_000, generator=torch.Generator().manual_seed(seed))
    k = round(0.01 * x.numel())
    c = TopK(TopKConfig(ratio=0.01, seed=seed))
    assert torch.equal(_on_device_kept(c, x), x.abs().topk(k).indices.sort().values)


def test_selection_on_the_device_sends_k_distinct_positions_whatever_the_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import commhooks.compressors.topk as topk

    k, gen = 300, torch.Generator()
    x = torch.full((30_000,), 1e-3)
    x[10:15] = torch.arange(1.0, 6.0)
    mag = x.abs()
    # Far more candidates than room (a threshold below everything): k of them, distinct.
    monkeypatch.setattr(topk, "sampled_threshold", lambda *a: torch.tensor(0.0))
    picked = topk._select_on_device(mag, k, gen, TopKConfig(ratio=0.01))
    assert picked.unique().numel() == k
    # Too few (a threshold above all but two values): those two, then distinct positions
    # below the threshold.
    monkeypatch.setattr(topk, "sampled_threshold", lambda *a: torch.tensor(3.5))
    picked = topk._select_on_device(mag, k, gen, TopKConfig(ratio=0.01))
    assert picked.unique().numel() == k and bool((picked < x.numel()).all())
    assert {13, 14} <= set(picked.tolist())
