"""Ternary (TernGrad / threshold): values in {-a, 0, a}, unbiasedness, clipping, exact bytes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.compressors.base import Kind
from commhooks.compressors.ternary import Ternary, TernaryConfig

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def threshold_reference(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """TWN ternarization in fp64: (decoded values, scale)."""
    mag = x.double().abs()
    keep = mag > threshold * mag.mean()
    a = float(mag[keep].mean()) if keep.any() else 0.0
    return torch.where(keep, torch.sign(x.double()) * a, 0.0), a


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["stochastic", "threshold"])
def test_values_are_minus_zero_plus_scale(dtype: torch.dtype, mode: str) -> None:
    c = commhooks.compressor(f"ternary:mode={mode}")
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        payload, ctx = c.compress(x)
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel() == 0:
            continue
        a = payload[1]
        assert a.dtype == torch.float32 and a.numel() == 1
        a_out = a.to(dtype)
        assert ((y == 0) | (y == a_out) | (y == -a_out)).all()
        assert (y.double() * x.double() >= 0).all()  # never the wrong sign
        if mode == "stochastic":
            assert a == x.float().abs().max()
        else:
            ref, a_ref = threshold_reference(x, 0.7)
            assert math.isclose(float(a), a_ref, rel_tol=1e-6)
            torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=1e-6, atol=0)


def test_threshold_mode_is_deterministic_and_keeps_the_large_ones() -> None:
    x = torch.tensor([0.1, -0.2, 3.0, -4.0, 0.05, 1.0])
    c = commhooks.compressor("ternary:mode=threshold,threshold=1.0")
    # mean|x| = 1.391...: keep 3 and -4, a = 3.5.
    y = c.decompress(*c.compress(x))
    torch.testing.assert_close(y, torch.tensor([0.0, 0, 3.5, -3.5, 0, 0]))
    assert all(torch.equal(p, q) for p, q in zip(c.compress(x)[0], c.compress(x)[0]))
    zero = c.decompress(*c.compress(torch.zeros(10)))
    assert torch.equal(zero, torch.zeros(10))


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> None:
    """Linear statistics of the per-element mean error, each within 5 standard errors.

    Each statistic sums many independent errors, so it is close to normal even where single
    elements (rarely kept) are not.
    """
    trials = samples.shape[0]
    err = samples.double().mean(0) - x.double()
    flips = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    for w in (torch.ones_like(err), torch.sign(x.double()), flips.double()):
        stat = (w * err).sum()
        se = ((w.square() * var.double()).sum() / trials).sqrt()
        slack = 1e-6 * x.double().abs().sum()  # fp32 arithmetic in the encoder/decoder
        assert stat.abs() <= 5 * se + slack, (float(stat), float(se))


def test_stochastic_mode_is_unbiased() -> None:
    n, trials = 1000, 2000
    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    c = commhooks.compressor("ternary")
    # trials stacked copies: max|x| is the same, the keep draws are independent.
    samples = c.decompress(*c.compress(x.repeat(trials))).view(trials, n)
    a = x.abs().max().double()
    p = x.double().abs() / a
    assert_unbiased(samples, x, a.square() * p * (1 - p))


def test_clipping_bounds_the_scale_and_is_biased() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    x[0] = 100.0  # an outlier that would otherwise set a
    c = commhooks.compressor("ternary:clip=2.5")
    payload, ctx = c.compress(x)
    sigma = x.double().std(correction=0)
    assert math.isclose(float(payload[1]), float(2.5 * sigma), rel_tol=1e-5)
    y = c.decompress(payload, ctx)
    assert float(y[0]) == pytest.approx(float(2.5 * sigma), rel=1e-5)  # kept surely, clipped
    assert not c.capabilities.unbiased
    assert commhooks.compressor("ternary:clip=none").config.clip is None


def test_single_element_with_clip_is_finite() -> None:
    # Population std of one element is 0, not NaN: clipping sends it to zero.
    c = commhooks.compressor("ternary:clip=2.5")
    assert torch.equal(c.decompress(*c.compress(torch.tensor([3.0]))), torch.zeros(1))


@pytest.mark.parametrize("n", [1, 4, 5, 6, 1000, 4097])
def test_payload_bytes_are_exact(n: int) -> None:
    for spec in ("ternary", "ternary:mode=threshold"):
        c = commhooks.compressor(spec)
        for dtype in (torch.bfloat16, torch.float64):
            payload, _ = c.compress(torch.randn(n).to(dtype))
            # Five trits per byte (3^5 = 243 <= 256), plus one fp32 scale.
            assert payload[0].dtype == torch.uint8
            assert c.nbytes(payload) == math.ceil(n / 5) + 4


def test_entropy_coding_decodes_the_same_and_saves_bytes(monkeypatch) -> None:
    # Same seed, same draws on the torch path; the native kernels (plain coding only) draw
    # their own noise, so they are off here.
    monkeypatch.setenv("COMMHOOKS_NATIVE", "0")
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(6))
    plain = commhooks.compressor("ternary")
    coded = commhooks.compressor("ternary:entropy=true")
    assert plain.capabilities.static_size and not coded.capabilities.static_size
    pp, pctx = plain.compress(x)
    cp, cctx = coded.compress(x)  # same seed, same draws
    torch.testing.assert_close(coded.decompress(cp, cctx), plain.decompress(pp, pctx))
    # a = max|x| of 50k normals is ~4.3 sigma: most trits are 0, so coding pays.
    assert coded.nbytes(cp) < plain.nbytes(pp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize(
    "spec",
    ["ternary", "ternary:mode=threshold", "ternary:clip=2.5", "ternary:mode=threshold,clip=1"],
)
def test_non_finite_input_gives_non_finite_output(spec: str, bad: float) -> None:
    c = commhooks.compressor(spec)
    for dtype in DTYPES:
        x = torch.randn(300).to(dtype)
        x[100] = bad
        y = c.decompress(*c.compress(x))
        assert not torch.isfinite(y).all(), f"{spec} {dtype} hid {bad}"


finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.one_of(finite, finite, finite, non_finite), min_size=1, max_size=300),
    mode=st.sampled_from(["stochastic", "threshold"]),
    threshold=st.floats(0.0, 3.0),
    clip=st.one_of(st.none(), st.floats(0.1, 5.0)),
)
def test_hypothesis_inputs(
    values: list[float], mode: str, threshold: float, clip: float | None
) -> None:
    c = Ternary(TernaryConfig(mode=mode, threshold=threshold, clip=clip))  # type: ignore[arg-type]
    x = torch.tensor(values, dtype=torch.float32)
    (data, a), ctx = c.compress(x)
    y = c.decompress((data, a), ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).all()
        return
    assert torch.isfinite(y).all()
    assert ((y == 0) | (y.abs() == a)).all() and (y * x >= 0).all()
    if clip is None and mode == "stochastic":
        assert a == x.abs().max()
    if clip is None and mode == "threshold":
        _, a_ref = threshold_reference(x, threshold)
        assert math.isclose(float(a), a_ref, rel_tol=1e-5)


def test_capabilities() -> None:
    caps = commhooks.compressor("ternary").capabilities
    assert caps.kind == Kind.QUANTIZER and caps.unbiased and caps.static_size
    assert not caps.summable and caps.rounds == 1
    assert not commhooks.compressor("ternary:mode=threshold").capabilities.unbiased
    assert not commhooks.compressor("ternary:entropy=true").capabilities.static_size


def test_spec_strings_and_registry() -> None:
    assert "ternary" in commhooks.available()
    c = commhooks.compressor("ternary:mode=threshold,threshold=0.5,clip=2.5,seed=2")
    assert c.config == TernaryConfig(mode="threshold", threshold=0.5, clip=2.5, seed=2)
    assert commhooks.compressor(c.config.spec()).config == c.config


@pytest.mark.parametrize(
    "spec,field",
    [
        ("ternary:mode=binary", "mode"),
        ("ternary:threshold=-0.1", "threshold"),
        ("ternary:threshold=nan", "threshold"),
        ("ternary:clip=0", "clip"),
        ("ternary:clip=-1", "clip"),
        ("ternary:clip=inf", "clip"),
        ("ternary:entropy=2", "entropy"),
        ("ternary:seed=a", "seed"),
    ],
)
def test_bad_config_names_the_field(spec: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        commhooks.compressor(spec)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["ternary", "ternary:mode=threshold", "ternary:clip=2.5"])
def test_cuda_round_trip(spec: str) -> None:
    c = commhooks.compressor(spec)
    x = torch.randn(257, 33, device="cuda")
    payload, ctx = c.compress(x)
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape
    a = payload[1]
    assert ((y == 0) | (y.abs() == a)).all() and (y * x >= 0).all()
    if c.config.mode == "threshold":
        torch.testing.assert_close(y.cpu(), c.decompress(*c.compress(x.cpu())))
