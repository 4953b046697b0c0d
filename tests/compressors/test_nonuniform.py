"""Non-uniform quantization: level tables, nearest-level rounding, unbiased stochastic rounding,
exact bytes, and the stateful quantile levels (refit schedule, non-finite steps, state_dict)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.coding.symbols import decode_symbols
from commhooks.compressors.base import Compressor, Kind
from commhooks.compressors.nonuniform import (
    NonUniform,
    NonUniformConfig,
    level_table,
    quantize_to_levels,
)

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KINDS = ["log", "mulaw", "quantile"]


def levels_of(c: NonUniform, payload: tuple) -> torch.Tensor:
    """The level table a payload was coded with, in fp64."""
    if c.config.levels == "quantile":
        return payload[2].double()
    return level_table(c.config.levels, c.config.bits, c.config.mu, dtype=torch.float64)


def per_element(scales: torch.Tensor, chunk: int, n: int) -> torch.Tensor:
    return scales.double().repeat_interleave(chunk)[:n]


# -- level tables -------------------------------------------------------------------------------


def test_log_table_is_zero_and_powers_of_two() -> None:
    t = level_table("log", 4)
    assert t.tolist() == [0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    assert level_table("log", 2).tolist() == [0.0, 1.0]
    # 8 bits: 128 levels down to 2**-126, still a normal fp32 number.
    t8 = level_table("log", 8)
    assert t8.numel() == 128 and float(t8[1]) == 2.0**-126


@pytest.mark.parametrize("mu", [255.0, 1.0, 1e-30])
def test_mulaw_table_matches_the_companding_formula(mu: float) -> None:
    count = 16
    t = level_table("mulaw", 5, mu, dtype=torch.float64)
    j = torch.arange(count, dtype=torch.float64)
    # The textbook form; for tiny mu it cancels, and the limit there is linear spacing.
    expect = ((1 + mu) ** (j / (count - 1)) - 1) / mu if mu > 1e-10 else j / (count - 1)
    torch.testing.assert_close(t, expect, rtol=1e-12, atol=1e-12)
    assert float(t[0]) == 0.0 and float(t[-1]) == 1.0
    assert (t.diff() > 0).all()


def test_quantize_to_levels_nearest_and_bracketing() -> None:
    levels = torch.tensor([0.0, 0.25, 0.25, 0.5, 1.0])
    u = torch.tensor([0.0, 0.1, 0.13, 0.25, 0.37, 0.38, 0.8, 1.0])
    idx = quantize_to_levels(u, levels, None)
    assert levels[idx].tolist() == [0.0, 0.0, 0.25, 0.25, 0.25, 0.5, 1.0, 1.0]
    # Stochastic: always one of the two bracketing levels, exact values stay exact.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        got = levels[quantize_to_levels(u, levels, gen)]
        assert got[0] == 0 and got[3] == 0.25 and got[-1] == 1
        assert ((got == 0.5) | (got == 1.0))[6] and ((got == 0.25) | (got == 0.5))[4]


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_rounding_picks_the_nearest_level(kind: str, dtype: torch.dtype) -> None:
    c = commhooks.compressor(f"nonuniform:bits=4,levels={kind},chunk=100")
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        x = (torch.randn(shape, generator=gen) * 2).to(dtype)
        payload, ctx = c.compress(x, "w")
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel() == 0:
            assert payload == ()
            continue
        n = x.numel()
        levels = levels_of(c, payload)
        s = per_element(payload[1], c.config.chunk, n)
        xd = x.double().reshape(-1)
        u = xd.abs() / s
        sym = decode_symbols(payload[0], 2 * levels.numel(), n)
        chosen = levels[sym >> 1]
        nearest = (u[:, None] - levels[None, :]).abs().min(1).values
        # fp32 arithmetic in the encoder can only flip exact midpoint ties.
        assert ((u - chosen).abs() <= nearest + 1e-6).all()
        # Signs: negatives decode negative (or to zero), level 0 is sent unsigned.
        assert ((sym & 1) == ((xd < 0) & (chosen > 0)).long()).all()
        eps = torch.finfo(dtype).eps
        bound = s * (nearest + 1e-6) + eps * s
        assert ((y.double().reshape(-1) - xd).abs() <= bound).all()
        # Deterministic: same input, same bytes (for quantile the levels are reused).
        again, _ = c.compress(x, "w")
        assert all(torch.equal(a, b) for a, b in zip(payload, again))


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_extremes_and_zeros_are_exact(kind: str) -> None:
    c = commhooks.compressor(f"nonuniform:bits=3,levels={kind},chunk=4")
    x = torch.tensor([-3.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0, 0.0])
    y = c.decompress(*c.compress(x))
    # Level 1 is every chunk's max |x|; zeros (and an all-zero chunk) decode to zero.
    assert y[0] == -3.0 and y[8] == 8.0
    assert (y[[1, 3, 4, 5, 6, 7, 9]] == 0).all()


def test_fp64_keeps_fp64_scales_and_precision() -> None:
    x = torch.randn(3000, dtype=torch.float64)
    c = commhooks.compressor("nonuniform:bits=8,levels=mulaw,chunk=1000")
    payload, ctx = c.compress(x)
    assert payload[1].dtype == torch.float64
    y = c.decompress(payload, ctx)
    assert y.dtype == torch.float64
    assert (y - x).abs().max() < 0.05 * x.abs().max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits,chunk,n", [(2, 7, 1), (3, 100, 1023), (4, 2048, 5000), (8, 64, 999)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_payload_bytes(kind: str, bits: int, chunk: int, n: int, dtype: torch.dtype) -> None:
    c = commhooks.compressor(f"nonuniform:bits={bits},levels={kind},chunk={chunk}")
    payload, _ = c.compress(torch.randn(n, dtype=dtype), "w")
    chunks = -(-n // chunk)
    scale_bytes = 8 if dtype == torch.float64 else 4
    level_bytes = 4 * 2 ** (bits - 1) if kind == "quantile" else 0
    expect = math.ceil(n * bits / 8) + chunks * scale_bytes + level_bytes
    assert Compressor.nbytes(payload) == expect
    assert len(payload) == (3 if kind == "quantile" else 2)


# -- stochastic rounding --------------------------------------------------------------------------


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> None:
    """Linear statistics of the per-element mean error, each within 5 standard errors."""
    trials = samples.shape[0]
    err = samples.double().mean(0) - x.double()
    flips = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for w in (torch.ones_like(err), torch.sign(x.double()), flips.double()):
        stat = (w * err).sum()
        se = ((w.square() * var).sum() / trials).sqrt()
        slack = 1e-6 * x.double().abs().sum()  # fp32 arithmetic in the encoder/decoder
        assert stat.abs() <= 5 * se + slack, (float(stat), float(se))


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_rounding_is_unbiased(kind: str) -> None:
    n, trials = 500, 2000
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    c = commhooks.compressor(f"nonuniform:bits=3,levels={kind},chunk={n},stochastic=true")
    assert c.capabilities.unbiased
    # One call on stacked copies, one chunk each: the same scale (and, for quantile, the same
    # fitted levels) on every row, independent rounding noise.
    payload, ctx = c.compress(x.repeat(trials))
    samples = c.decompress(payload, ctx).view(trials, n)
    levels = levels_of(c, payload)
    s = x.abs().max().double()
    u = x.double().abs() / s
    below = (torch.searchsorted(levels, u, right=True) - 1).clamp(0, levels.numel() - 2)
    lo, hi = levels[below], levels[below + 1]
    var = (u - lo) * (hi - u) * s**2  # Bernoulli between the bracketing levels
    assert_unbiased(samples, x, var)
    # Not a degenerate pass: the rounding really is random.
    assert samples.std(0).max() > 0


# -- quantile levels ------------------------------------------------------------------------------


def test_quantile_levels_follow_the_magnitude_distribution() -> None:
    # |x| / max|x| is uniform on [0, 1] here, so fitted levels are close to evenly spaced.
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = commhooks.compressor("nonuniform:bits=4,levels=quantile,chunk=200000,sample=20000")
    payload, _ = c.compress(x, "w")
    levels = payload[2]
    assert levels.dtype == torch.float32 and levels.numel() == 8
    assert float(levels[0]) == 0.0 and float(levels[-1]) == 1.0
    assert (levels.diff() >= 0).all()
    torch.testing.assert_close(levels, torch.linspace(0, 1, 8), atol=0.02, rtol=0)


def test_quantile_levels_adapt_to_heavy_tails() -> None:
    # Gaussian-cubed data: most magnitudes are tiny relative to the max, so the fitted levels
    # crowd near zero, far below the evenly spaced ones.
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(0)) ** 3
    c = commhooks.compressor("nonuniform:bits=4,levels=quantile,chunk=50000")
    levels = c.compress(x)[0][2]
    assert float(levels[4]) < 0.05

    def usage_entropy_and_median_rel_err(spec: str) -> tuple[float, float]:
        q = commhooks.compressor(f"nonuniform:bits=4,chunk=50000,{spec}")
        payload, ctx = q.compress(x)
        idx = decode_symbols(payload[0], 16, x.numel()) >> 1
        p = torch.bincount(idx, minlength=8).double() / x.numel()
        p = p[p > 0]
        rel = ((q.decompress(payload, ctx) - x).abs() / x.abs()).median()
        return float(-(p * p.log2()).sum()), float(rel)

    # Equal-mass bins: the level indices carry close to their 3 bits, and the typical element
    # is coded more precisely than with evenly spaced or mu-law levels.
    h_q, rel_q = usage_entropy_and_median_rel_err("levels=quantile")
    assert h_q > 2.5
    for spec in ("levels=mulaw,mu=1e-9", "levels=mulaw"):
        h, rel = usage_entropy_and_median_rel_err(spec)
        assert h_q > h and rel_q < rel


def test_quantile_refit_schedule() -> None:
    gen = torch.Generator().manual_seed(0)
    narrow = torch.randn(4000, generator=gen) ** 5  # heavy tails: levels near 0
    wide = torch.rand(4000, generator=gen) * 2 - 1  # uniform: levels spread out
    c = commhooks.compressor("nonuniform:bits=4,levels=quantile,refit_every=3")
    first = c.compress(narrow, "w")[0][2]
    # Calls 2 and 3 reuse call 1's levels whatever the data.
    for _ in range(2):
        assert torch.equal(c.compress(wide, "w")[0][2], first)
    # Call 4 refits.
    refit = c.compress(wide, "w")[0][2]
    assert not torch.equal(refit, first) and float(refit[4]) > float(first[4])
    # Keys have their own schedules; key=None refits every call and stores nothing.
    assert not torch.equal(c.compress(wide, "v")[0][2], first)
    none_a = c.compress(narrow)[0][2]
    none_b = c.compress(wide)[0][2]
    assert torch.equal(none_a, first) and not torch.equal(none_b, none_a)
    assert set(c.state_dict()["levels"]) == {"w", "v"}
    assert c.state_dict()["calls"] == {"w": 4, "v": 1}


def test_quantile_levels_survive_a_non_finite_step() -> None:
    c = commhooks.compressor("nonuniform:bits=3,levels=quantile,refit_every=1")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    before = c.compress(x, "w")[0][2]
    bad = torch.rand(1000) * 2 - 1
    bad[10] = float("nan")
    payload, ctx = c.compress(bad, "w")
    assert torch.equal(payload[2], before)
    assert torch.equal(c.state_dict()["levels"]["w"], before)
    assert not torch.isfinite(c.decompress(payload, ctx)).all()


def test_any_rank_decodes_another_ranks_fitted_levels() -> None:
    a = commhooks.compressor("nonuniform:bits=4,levels=quantile")
    b = commhooks.compressor("nonuniform:bits=4,levels=quantile")
    b.set_seed(7)
    x = torch.randn(300, 20) ** 3
    pa, ca = a.compress(x, "w")
    pb, cb = b.compress(torch.rand(300, 20), "w")
    assert not torch.equal(pa[2], pb[2])
    torch.testing.assert_close(b.decompress(pa, cb), a.decompress(pa, ca), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_state_dict_round_trip(kind: str, stochastic: bool) -> None:
    spec = f"nonuniform:levels={kind},stochastic={stochastic},refit_every=2,sample=500"
    a = commhooks.compressor(spec)
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(2000, generator=gen) * (i + 1) for i, k in enumerate("abc")}
    for _ in range(3):
        for k, x in xs.items():
            a.compress(x, k)
    state = a.state_dict()
    if kind == "quantile":
        assert set(state["levels"]) == set(xs) and state["calls"] == dict.fromkeys(xs, 3)
    # Through torch.save, as a checkpoint would.
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = commhooks.compressor(spec)
    b.load_state_dict(torch.load(buf, weights_only=False))
    for _ in range(2):  # the first call reuses stored levels, the second refits
        for k, x in xs.items():
            pa, _ = a.compress(x, k)
            pb, _ = b.compress(x, k)
            assert len(pa) == len(pb)
            assert all(torch.equal(ta, tb) for ta, tb in zip(pa, pb))


# -- hypothesis -----------------------------------------------------------------------------------

any_floats = st.lists(
    st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=80
)


@settings(max_examples=30, deadline=None)
@given(
    values=any_floats,
    kind=st.sampled_from(KINDS),
    bits=st.integers(2, 8),
    chunk=st.sampled_from([1, 3, 16, 2048]),
    stochastic=st.booleans(),
)
def test_hypothesis_finite_iff_input_finite(
    values: list[float], kind: str, bits: int, chunk: int, stochastic: bool
) -> None:
    c = NonUniform(NonUniformConfig(bits=bits, levels=kind, chunk=chunk, stochastic=stochastic))
    x = torch.tensor(values, dtype=torch.float32)
    payload, ctx = c.compress(x, "w")
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    finite = bool(torch.isfinite(x).all())
    assert bool(torch.isfinite(y).all()) == finite
    if finite:
        # Never beyond the chunk's max magnitude, and signs never flip.
        s = per_element(payload[1], chunk, x.numel()).float()
        assert (y.abs() <= s).all()
        assert ((y * x) >= 0).all()


# -- entropy, capabilities, config ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_coding_decodes_the_same_values(kind: str) -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    plain = commhooks.compressor(f"nonuniform:levels={kind}")
    coded = commhooks.compressor(f"nonuniform:levels={kind},entropy=true")
    assert not coded.capabilities.static_size and plain.capabilities.static_size
    y_plain = plain.decompress(*plain.compress(x))
    payload, ctx = coded.compress(x)
    torch.testing.assert_close(coded.decompress(payload, ctx), y_plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_capabilities(kind: str, stochastic: bool) -> None:
    caps = commhooks.compressor(f"nonuniform:levels={kind},stochastic={stochastic}").capabilities
    assert caps.kind == Kind.QUANTIZER and not caps.summable and caps.rounds == 1
    assert caps.static_size and caps.unbiased == stochastic
    assert caps.stateful == (kind == "quantile")


def test_spec_string_and_registry() -> None:
    assert "nonuniform" in commhooks.available()
    c = commhooks.compressor("nonuniform:bits=6,levels=mulaw,mu=100,chunk=512,stochastic=true")
    assert isinstance(c, NonUniform)
    assert c.config == NonUniformConfig(
        bits=6, levels="mulaw", mu=100.0, chunk=512, stochastic=True
    )
    assert commhooks.compressor(c.config.spec()).config == c.config


@pytest.mark.parametrize(
    "field,value",
    [
        ("bits", 1),
        ("bits", 9),
        ("bits", 4.0),
        ("levels", "linear"),
        ("chunk", 0),
        ("mu", 0.0),
        ("mu", -1.0),
        ("mu", float("inf")),
        ("sample", 0),
        ("refit_every", 0),
        ("stochastic", "yes"),
        ("entropy", 1),
        ("seed", "x"),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        NonUniformConfig(**{field: value})  # type: ignore[arg-type]


def test_bad_spec_names_the_field() -> None:
    with pytest.raises(ValueError, match="levels"):
        commhooks.compressor("nonuniform:levels=cubic")
    with pytest.raises(ValueError, match="bits"):
        commhooks.compressor("nonuniform:bits=1")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_cuda_round_trip(kind: str, stochastic: bool) -> None:
    spec = f"nonuniform:levels={kind},stochastic={stochastic},chunk=1000"
    c = commhooks.compressor(spec)
    x = torch.randn(257, 33, device="cuda")
    payload, ctx = c.compress(x, "w")
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape and y.dtype == x.dtype
    # Every decoded magnitude is a level times its chunk scale, with the sign kept.
    s = per_element(payload[1], 1000, x.numel()).cuda()
    ratio = y.double().reshape(-1).abs() / s
    levels = levels_of(c, payload).cuda()
    assert ((ratio[:, None] - levels[None, :]).abs().min(1).values < 1e-6).all()
    assert ((y * x) >= 0).all()
    if not stochastic and kind != "quantile":
        # Fixed tables, correctly rounded arithmetic: the same bytes as on the CPU. (Fitted
        # levels may differ in the last bit where the GPU fuses a multiply-add.)
        cpu = commhooks.compressor(spec)
        for a, b in zip(payload, cpu.compress(x.cpu(), "w")[0]):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
