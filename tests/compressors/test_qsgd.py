"""QSGD: levels on the bucket norm, unbiasedness, exact bytes (radix packing), bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.compressors.base import Kind
from commhooks.compressors.qsgd import QSGD, QSGDConfig

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def bucket_norms(x: torch.Tensor, chunk: int, norm: str) -> torch.Tensor:
    """The reference per-bucket norm, in fp64, one value per element."""
    flat = x.double().reshape(-1)
    n = flat.numel()
    rows = torch.nn.functional.pad(flat, (0, (-n) % chunk)).view(-1, chunk)
    v = rows.abs().amax(1) if norm == "max" else rows.norm(dim=1)
    return v.repeat_interleave(chunk)[:n]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "levels,chunk,norm", [(16, 2048, "l2"), (1, 64, "l2"), (4, 100, "max"), (127, 7, "max")]
)
def test_round_trip_lands_on_a_neighbouring_level(
    dtype: torch.dtype, levels: int, chunk: int, norm: str
) -> None:
    c = QSGD(QSGDConfig(levels=levels, chunk=chunk, norm=norm))
    gen = torch.Generator().manual_seed(levels)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        payload, ctx = c.compress(x)
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel() == 0:
            continue
        v = bucket_norms(x, chunk, norm)
        torch.testing.assert_close(
            payload[1].double().repeat_interleave(chunk)[: x.numel()], v, rtol=1e-6, atol=0
        )
        unit = v / levels
        yd, xd = y.double().reshape(-1), x.double().reshape(-1)
        # The norm travels in fp32; the output is rounded to dtype.
        eps = torch.finfo(dtype).eps + torch.finfo(torch.float32).eps
        rounding = 2 * eps * v
        # One of the two levels around |x|, with x's sign (or 0).
        assert ((yd - xd).abs() <= unit + rounding).all()
        assert (yd * xd >= 0).all()
        assert (yd.abs() <= v + rounding).all()
        multiples = yd / unit
        assert ((multiples - multiples.round()).abs() <= 2 * eps * multiples.abs() + 1e-4).all()


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> None:
    """Linear statistics of the per-element mean error, each within 5 standard errors.

    Each statistic sums many independent errors, so it is close to normal even where single
    elements (rarely rounded up) are not.
    """
    trials = samples.shape[0]
    err = samples.double().mean(0) - x.double()
    flips = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    for w in (torch.ones_like(err), torch.sign(x.double()), flips.double()):
        stat = (w * err).sum()
        se = ((w.square() * var.double()).sum() / trials).sqrt()
        slack = 1e-6 * x.double().abs().sum()  # fp32 arithmetic in the encoder/decoder
        assert stat.abs() <= 5 * se + slack, (float(stat), float(se))


@pytest.mark.parametrize("levels,norm", [(1, "l2"), (4, "l2"), (2, "max")])
def test_unbiased(levels: int, norm: str) -> None:
    n, trials = 1000, 2000
    x = torch.randn(n, generator=torch.Generator().manual_seed(levels))
    c = commhooks.compressor(f"qsgd:levels={levels},chunk={n},norm={norm}")
    # trials stacked copies, one bucket each: the same norm, independent rounding.
    samples = c.decompress(*c.compress(x.repeat(trials))).view(trials, n)
    v = bucket_norms(x, n, norm)
    r = x.double().abs() / v * levels
    p = r - r.floor()
    assert_unbiased(samples, x, (v / levels).square() * p * (1 - p))


def test_variance_matches_the_qsgd_bound() -> None:
    """E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 for the l2 norm (QSGD Lemma 3.1)."""
    d, s, trials = 256, 2, 400
    x = torch.randn(d, generator=torch.Generator().manual_seed(1))
    c = commhooks.compressor(f"qsgd:levels={s},chunk={d}")
    samples = c.decompress(*c.compress(x.repeat(trials))).view(trials, d)
    mse = (samples - x).square().sum(1).mean()
    assert mse <= min(d / s**2, math.sqrt(d) / s) * x.square().sum()


# alphabet 2s+1: 3 -> 5 per byte, 5 -> 3 per byte, 15 -> 4 bits, 33 -> 6 bits, 255 -> 8 bits.
@pytest.mark.parametrize(
    "levels,symbol_bytes",
    [
        (1, lambda n: math.ceil(n / 5)),
        (2, lambda n: math.ceil(n / 3)),
        (7, lambda n: math.ceil(n / 2)),
        (16, lambda n: math.ceil(6 * n / 8)),
        (127, lambda n: n),
    ],
)
@pytest.mark.parametrize("n,chunk", [(1, 2048), (1000, 64), (4097, 2048)])
def test_payload_bytes_are_exact(levels: int, symbol_bytes, n: int, chunk: int) -> None:
    c = commhooks.compressor(f"qsgd:levels={levels},chunk={chunk}")
    for dtype in (torch.float16, torch.float64):
        payload, _ = c.compress(torch.randn(n).to(dtype))
        assert payload[0].dtype == torch.uint8 and payload[1].dtype == torch.float32
        assert c.nbytes(payload) == symbol_bytes(n) + 4 * math.ceil(n / chunk)


def test_zero_bucket_decodes_to_zero() -> None:
    c = commhooks.compressor("qsgd:chunk=4")
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -2.0])
    y = c.decompress(*c.compress(x))
    assert torch.equal(y[:4], torch.zeros(4)) and torch.isfinite(y).all()


def test_huge_values_do_not_overflow_the_l2_norm() -> None:
    x = torch.tensor([1e20, -1e20, 3e19])
    c = commhooks.compressor("qsgd:levels=4")
    payload, ctx = c.compress(x)
    torch.testing.assert_close(payload[1], x.double().norm().float().reshape(1))
    y = c.decompress(payload, ctx)
    assert torch.isfinite(y).all() and (y.abs() <= payload[1] * (1 + 1e-6)).all()


def test_levels_one_with_max_norm_is_ternary() -> None:
    c = commhooks.compressor("qsgd:levels=1,norm=max")
    x = torch.randn(500)
    y = c.decompress(*c.compress(x))
    m = x.abs().max()
    assert set(y.unique().tolist()) <= {-float(m), 0.0, float(m)}


def test_entropy_coding_decodes_the_same_and_saves_bytes(monkeypatch) -> None:
    # Same seed, same draws on the torch path; the native kernels (plain coding only) draw
    # their own noise, so they are off here.
    monkeypatch.setenv("COMMHOOKS_NATIVE", "0")
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    plain = commhooks.compressor("qsgd:levels=4")
    coded = commhooks.compressor("qsgd:levels=4,entropy=true")
    assert plain.capabilities.static_size and not coded.capabilities.static_size
    pp, pctx = plain.compress(x)
    cp, cctx = coded.compress(x)  # same seed, same draws
    torch.testing.assert_close(coded.decompress(cp, cctx), plain.decompress(pp, pctx))
    # With the l2 norm over 2048 elements almost every level is 0: coding must pay off.
    assert coded.nbytes(cp) < plain.nbytes(pp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("norm", ["l2", "max"])
def test_non_finite_input_gives_non_finite_output(norm: str, bad: float) -> None:
    c = commhooks.compressor(f"qsgd:norm={norm},chunk=64")
    for dtype in DTYPES:
        x = torch.randn(300).to(dtype)
        x[100] = bad
        y = c.decompress(*c.compress(x))
        assert not torch.isfinite(y[100]), f"{norm} {dtype} hid {bad}"


finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.one_of(finite, finite, finite, non_finite), min_size=1, max_size=300),
    levels=st.integers(1, 127),
    chunk=st.integers(1, 64),
    norm=st.sampled_from(["l2", "max"]),
)
def test_hypothesis_inputs(values: list[float], levels: int, chunk: int, norm: str) -> None:
    c = QSGD(QSGDConfig(levels=levels, chunk=chunk, norm=norm))
    x = torch.tensor(values, dtype=torch.float32)
    y = c.decompress(*c.compress(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).all()
        return
    assert torch.isfinite(y).all()
    v = bucket_norms(x, chunk, norm)
    # The decoder's fp32 step norm / levels rounds to fp32's subnormal grid (2**-149) below
    # 1.2e-38, so each of up to ``levels`` steps may be off by half of that (a norm of 2**-149
    # with 2 levels decodes to 0, an error of 2**-149 where the relative bound allows half).
    subnormal = levels * 2.0**-149
    assert ((y.double() - x.double()).abs() <= v / levels * (1 + 1e-5) + subnormal).all()


def test_capabilities() -> None:
    caps = commhooks.compressor("qsgd").capabilities
    assert caps.kind == Kind.QUANTIZER and caps.unbiased and caps.static_size
    assert not caps.summable and caps.rounds == 1 and not caps.stateful


def test_spec_strings_and_registry() -> None:
    assert "qsgd" in commhooks.available()
    c = commhooks.compressor("qsgd:levels=8,chunk=512,norm=max,entropy=true,seed=4")
    assert c.config == QSGDConfig(levels=8, chunk=512, norm="max", entropy=True, seed=4)
    assert commhooks.compressor(c.config.spec()).config == c.config


@pytest.mark.parametrize(
    "spec,field",
    [
        ("qsgd:levels=0", "levels"),
        ("qsgd:levels=128", "levels"),
        ("qsgd:chunk=0", "chunk"),
        ("qsgd:norm=l1", "norm"),
        ("qsgd:entropy=sure", "entropy"),
        ("qsgd:seed=1.5", "seed"),
    ],
)
def test_bad_config_names_the_field(spec: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        commhooks.compressor(spec)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["qsgd", "qsgd:levels=1,entropy=true", "qsgd:norm=max"])
def test_cuda_round_trip(spec: str) -> None:
    c = commhooks.compressor(spec)
    x = torch.randn(257, 33, device="cuda")
    payload, ctx = c.compress(x)
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape
    v = bucket_norms(x.cpu(), c.config.chunk, c.config.norm)
    assert (
        ((y.cpu().double().reshape(-1) - x.cpu().double().reshape(-1)).abs())
        .le(v / c.config.levels * (1 + 1e-5))
        .all()
    )
