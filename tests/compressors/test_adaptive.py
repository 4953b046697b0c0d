"""Adaptive-bit quantization: running ranges, the bit budget across keys, exact bytes,
non-finite steps leaving the statistics alone, and state_dict reproducibility."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.coding.bitpack import packed_size, symbol_packing
from commhooks.compressors.adaptive import Adaptive, AdaptiveConfig
from commhooks.compressors.base import Compressor, Kind

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def bits_of(payload: tuple) -> int:
    return int(payload[0][0])


def bound(payload: tuple, dtype: torch.dtype) -> float:
    """Half a step plus the rounding of the fp32-range arithmetic and of the output cast."""
    lo, hi = payload[1].double().tolist()
    step = (hi - lo) / (2 ** bits_of(payload) - 1)
    mag = abs(lo) + abs(hi)
    return step / 2 + 4 * torch.finfo(torch.float32).eps * mag + torch.finfo(dtype).eps * mag


def expected_bits(state: dict, key: str, cfg: AdaptiveConfig) -> int:
    """The allocation rule, recomputed from a state_dict's statistics."""
    stats = state["stats"]
    pos = [(n, var) for _, _, var, n in stats.values() if var > 0]
    var = stats[key][2]
    if not pos:
        b = cfg.budget
    elif var <= 0:
        return cfg.min_bits
    else:
        log_g = math.fsum(n * math.log2(v) for n, v in pos) / sum(n for n, _ in pos)
        b = cfg.budget + 0.5 * (math.log2(var) - log_g)
    return min(max(math.floor(b + 0.5), cfg.min_bits), cfg.max_bits)


# -- round trips and wire format ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_error_is_at_most_half_a_step_over_the_own_range(dtype: torch.dtype, bits: int) -> None:
    # key=None: the range is the tensor's own, and min_bits == max_bits pins the width.
    c = commhooks.compressor(f"adaptive:budget={bits},min_bits={bits},max_bits={bits}")
    gen = torch.Generator().manual_seed(bits)
    for shape in SHAPES:
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        payload, ctx = c.compress(x)
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel() == 0:
            assert payload == ()
            continue
        assert bits_of(payload) == bits
        lo, hi = x.double().min(), x.double().max()
        torch.testing.assert_close(payload[1], torch.stack([lo, hi]).float(), rtol=0, atol=0)
        err = (y.double() - x.double()).abs().max()
        assert err <= bound(payload, dtype)
        assert all(torch.equal(a, b) for a, b in zip(payload, c.compress(x)[0]))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_exact_payload_bytes(bits: int, n: int) -> None:
    c = commhooks.compressor(f"adaptive:budget={bits},min_bits={bits},max_bits={bits}")
    payload, _ = c.compress(torch.randn(n, dtype=torch.float64), "w")
    head, rng, data = payload
    assert head.dtype == torch.uint8 and head.numel() == 1 and bits_of(payload) == bits
    assert rng.dtype == torch.float32 and rng.numel() == 2
    assert data.dtype == torch.uint8
    assert Compressor.nbytes(payload) == 1 + 8 + math.ceil(n * bits / 8)


def test_constant_tensor_is_exact() -> None:
    c = commhooks.compressor("adaptive")
    x = torch.full((100,), 2.5)
    for _ in range(3):
        torch.testing.assert_close(c.decompress(*c.compress(x, "w")), x, rtol=0, atol=0)


def test_huge_finite_values_decode_finite() -> None:
    # hi - lo overflows fp32 here; the midpoint/half-step grid does not.
    x = torch.tensor([-3e38, -1.0, 0.0, 2.0, 3.3e38])
    c = commhooks.compressor("adaptive:budget=1,min_bits=1,max_bits=1")
    payload, ctx = c.compress(x, "w")
    y = c.decompress(payload, ctx)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[[0, 4]], x[[0, 4]], rtol=1e-6, atol=0)


# -- running statistics ---------------------------------------------------------------------------


def test_first_call_takes_the_current_range_then_it_decays() -> None:
    c = commhooks.compressor("adaptive:decay=0.75")
    x1 = torch.randn(500, generator=torch.Generator().manual_seed(0))
    x2 = 3 * torch.randn(500, generator=torch.Generator().manual_seed(1))
    p1, _ = c.compress(x1, "w")
    lo1, hi1 = float(x1.min()), float(x1.max())
    assert p1[1].tolist() == [lo1, hi1]
    p2, ctx = c.compress(x2, "w")
    lo2, hi2 = float(x2.min()), float(x2.max())
    expect = torch.tensor([0.75 * lo1 + 0.25 * lo2, 0.75 * hi1 + 0.25 * hi2], dtype=torch.float32)
    assert torch.equal(p2[1], expect)
    var1 = float(x1.var(correction=0))
    var2 = float(x2.var(correction=0))
    stats = c.stats("w")
    assert stats is not None and stats.numel == 500
    assert stats.var == pytest.approx(0.75 * var1 + 0.25 * var2, rel=1e-12)
    # x2 reaches beyond the running range: those values are clamped to its ends.
    y = c.decompress(p2, ctx)
    assert float(y.max()) == pytest.approx(float(expect[1]), rel=1e-6)
    assert float(y.min()) == pytest.approx(float(expect[0]), rel=1e-6)
    assert y.max() < x2.max() and y.min() > x2.min()


def test_key_none_refreshes_every_call_and_stores_nothing() -> None:
    c = commhooks.compressor("adaptive")
    x = torch.randn(300)
    c.compress(x)
    c.compress(10 * x)
    assert c.state_dict()["stats"] == {}
    p, _ = c.compress(x)
    assert p[1].tolist() == [float(x.min()), float(x.max())]


# -- bit allocation -------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [4.0, 3.5, 2.0])
def test_allocation_tracks_variance_within_budget(budget: float) -> None:
    cfg = AdaptiveConfig(budget=budget)
    c = Adaptive(cfg)
    gen = torch.Generator().manual_seed(0)
    # Standard deviations a factor 2 apart: one bit apart in the allocation.
    stds = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    sizes = [4000, 1000, 3000, 500, 2000, 1500]
    keys = [f"layer{i}" for i in range(len(stds))]
    for _ in range(4):
        bits = []
        for k, s, n in zip(keys, stds, sizes):
            payload, _ = c.compress(torch.randn(n, generator=gen) * s, k)
            bits.append(bits_of(payload))
            assert bits[-1] == expected_bits(c.state_dict(), k, cfg)
    assert bits == sorted(bits) and bits[-1] > bits[0]
    avg = sum(b * n for b, n in zip(bits, sizes)) / sum(sizes)
    assert budget - 1 <= avg <= budget + 1
    # Each doubling of the standard deviation is worth about one bit.
    assert bits[-1] - bits[0] in (len(stds) - 2, len(stds) - 1, len(stds))


def test_allocation_clips_to_min_and_max_bits() -> None:
    c = commhooks.compressor("adaptive:budget=4,min_bits=2,max_bits=6")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        lo = bits_of(c.compress(torch.randn(1000, generator=gen) * 1e-6, "tiny")[0])
        hi = bits_of(c.compress(torch.randn(1000, generator=gen) * 1e6, "huge")[0])
    assert (lo, hi) == (2, 6)


def test_fallbacks_without_history() -> None:
    c = commhooks.compressor("adaptive:budget=3.6")
    # The first key is its own geometric mean: budget bits (rounded).
    assert bits_of(c.compress(torch.randn(100), "a")[0]) == 4
    # Zero variance while other keys have some: the fewest bits.
    assert bits_of(c.compress(torch.zeros(100), "z")[0]) == 1
    # All variances zero: budget bits.
    d = commhooks.compressor("adaptive:budget=3.6")
    assert bits_of(d.compress(torch.ones(100), "a")[0]) == 4
    assert bits_of(d.compress(torch.zeros(100))[0]) == 4
    # key=None with history: measured against the stored keys (and itself).
    c.compress(torch.randn(100), "a")
    assert bits_of(c.compress(torch.randn(100) * 16)[0]) > 4


def test_geometric_mean_sums_do_not_drift() -> None:
    c = commhooks.compressor("adaptive:decay=0.5")
    gen = torch.Generator().manual_seed(0)
    for step in range(150):
        for i in range(5):
            c.compress(torch.randn(50 + i, generator=gen) * (i + 1) * (1 + step % 7), f"k{i}")
    state = c.state_dict()
    sum_n, sum_nlog, _ = state["geomean"]
    stats = state["stats"].values()
    assert sum_n == sum(n for _, _, v, n in stats if v > 0)
    assert sum_nlog == pytest.approx(math.fsum(n * math.log2(v) for _, _, v, n in stats), rel=1e-12)


# -- non-finite input -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_input_poisons_output_and_keeps_the_stats(bad: float) -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(400, generator=gen) for _ in range(3)]
    a, twin = commhooks.compressor("adaptive"), commhooks.compressor("adaptive")
    for x in xs[:2]:
        a.compress(x, "w")
        twin.compress(x, "w")
    before = a.state_dict()
    poisoned = xs[2].clone()
    poisoned[123] = bad
    payload, ctx = a.compress(poisoned, "w")
    assert not torch.isfinite(a.decompress(payload, ctx)).all()
    # The cheapest payload: GradScaler drops it anyway.
    assert bits_of(payload) == a.config.min_bits
    after = a.state_dict()
    assert after["stats"] == before["stats"] and after["geomean"] == before["geomean"]
    # The next finite step is exactly what it would have been without the bad one.
    pa, _ = a.compress(xs[2], "w")
    pt, _ = twin.compress(xs[2], "w")
    assert all(torch.equal(u, v) for u, v in zip(pa, pt))


def test_non_finite_first_call_stores_nothing() -> None:
    c = commhooks.compressor("adaptive")
    x = torch.randn(10)
    x[0] = float("nan")
    y = c.decompress(*c.compress(x, "w"))
    assert torch.isnan(y).all()
    assert c.stats("w") is None


any_floats = st.lists(
    st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=80
)


@settings(max_examples=30, deadline=None)
@given(values=any_floats, stochastic=st.booleans(), decay=st.sampled_from([0.0, 0.5, 0.9]))
def test_hypothesis_finite_iff_input_finite(
    values: list[float], stochastic: bool, decay: float
) -> None:
    c = Adaptive(AdaptiveConfig(stochastic=stochastic, decay=decay))
    c.compress(torch.randn(len(values), generator=torch.Generator().manual_seed(0)), "w")
    before = c.state_dict()["stats"]
    x = torch.tensor(values, dtype=torch.float32)
    payload, ctx = c.compress(x, "w")
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    finite = bool(torch.isfinite(x).all())
    assert bool(torch.isfinite(y).all()) == finite
    if not finite:
        assert c.state_dict()["stats"] == before
    else:
        # Decoded values stay inside the (fp32) running range.
        lo, hi = payload[1].tolist()
        # Subnormals carry no relative precision: allow fp32's smallest normal on top.
        slack = 1e-6 * (abs(lo) + abs(hi)) + torch.finfo(torch.float32).tiny
        assert float(y.min()) >= lo - slack and float(y.max()) <= hi + slack


# -- stochastic rounding --------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_inside_the_range() -> None:
    n, trials = 500, 2000
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    c = commhooks.compressor("adaptive:budget=2,min_bits=2,max_bits=2,stochastic=true")
    # key=None: the range is the data's own, so it covers every value. Stacked copies share it.
    payload, ctx = c.compress(x.repeat(trials))
    samples = c.decompress(payload, ctx).view(trials, n).double()
    lo, hi = float(x.min()), float(x.max())
    step = (hi - lo) / 3
    q = (x.double() - lo) / step
    var = (q - q.floor()) * (q.floor() + 1 - q) * step**2
    err = samples.mean(0) - x.double()
    flips = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    for w in (torch.ones(n, dtype=torch.float64), torch.sign(x.double()), flips.double()):
        stat = (w * err).sum()
        se = ((w.square() * var).sum() / trials).sqrt()
        assert stat.abs() <= 5 * se + 1e-6 * x.abs().sum(), (float(stat), float(se))
    assert samples.std(0).max() > 0


# -- state, ranks, entropy ------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [False, True])
def test_state_dict_round_trip_reproduces_payloads(stochastic: bool) -> None:
    spec = f"adaptive:stochastic={stochastic},decay=0.8"
    a = commhooks.compressor(spec)
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(300 * (i + 1), generator=gen) * 4**i for i, k in enumerate("abcd")}
    for _ in range(3):
        for k, x in xs.items():
            a.compress(x, k)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = commhooks.compressor(spec)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert set(b.state_dict()["stats"]) == set(xs)
    for step in range(3):
        for k, x in xs.items():
            pa, _ = a.compress(x * (1 + step), k)
            pb, _ = b.compress(x * (1 + step), k)
            assert len(pa) == len(pb) == 3
            assert all(torch.equal(ta, tb) for ta, tb in zip(pa, pb))


def test_any_rank_decodes_another_ranks_bits_and_range() -> None:
    a, b = commhooks.compressor("adaptive"), commhooks.compressor("adaptive")
    b.set_seed(5)
    a.compress(torch.randn(1000) * 1e-3, "small")
    b.compress(torch.randn(1000) * 1e3, "big")
    x, z = torch.randn(40, 25), torch.randn(40, 25)
    pa, ca = a.compress(x, "w")
    pb, cb = b.compress(z, "w")
    assert bits_of(pa) != bits_of(pb)
    torch.testing.assert_close(b.decompress(pa, cb), a.decompress(pa, ca), rtol=0, atol=0)


def test_a_payload_no_bit_width_fits_is_refused() -> None:
    c = commhooks.compressor("adaptive")
    # Fewer than 8 codes: the header gives the width.
    payload, ctx = c.compress(torch.randn(4))
    with pytest.raises(ValueError, match="header says 9 bits"):
        c.decompress((torch.tensor([9], dtype=torch.uint8), *payload[1:]), ctx)
    # From 8 codes on, their byte count gives it: one byte short fits no width.
    payload, ctx = c.compress(torch.randn(16))
    with pytest.raises(ValueError, match=r"no width in 1\.\.8 fits"):
        c.decompress((*payload[:2], payload[2][:-1]), ctx)


@pytest.mark.parametrize("n", [8, 9, 15, 100, 4097])
def test_from_eight_codes_on_every_width_packs_to_its_own_size(n: int) -> None:
    # What the decoders rely on: plain bit packing, one byte count per width.
    assert [symbol_packing(1 << b) for b in range(1, 9)] == [(b, 0) for b in range(1, 9)]
    sizes = [packed_size(n, symbol_packing(1 << b)) for b in range(1, 9)]
    assert sizes == sorted(set(sizes))


@pytest.mark.parametrize("n", [8, 200_000])  # the torch path; the native kernels (2**14 on)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_every_width_decodes_by_its_size_whatever_the_header(n: int, bits: int) -> None:
    c = commhooks.compressor(f"adaptive:budget={bits},min_bits={bits},max_bits={bits}")
    payload, ctx = c.compress(torch.randn(n, generator=torch.Generator().manual_seed(n)))
    assert int(payload[0][0]) == bits
    # The decoders read no header back from the device then: one naming no width at all
    # decodes the same values.
    wrong = (torch.tensor([9], dtype=torch.uint8), *payload[1:])
    torch.testing.assert_close(c.decompress(wrong, ctx), c.decompress(payload, ctx))


def test_entropy_coding_decodes_the_same_values() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    plain, coded = commhooks.compressor("adaptive"), commhooks.compressor("adaptive:entropy=true")
    y_plain = plain.decompress(*plain.compress(x, "w"))
    payload, ctx = coded.compress(x, "w")
    torch.testing.assert_close(coded.decompress(payload, ctx), y_plain, rtol=0, atol=0)
    # Gaussian codes over a min-max range are far from uniform: coding pays.
    assert Compressor.nbytes(payload) < 9 + 20_000 * 4 / 8


# -- capabilities and config ----------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_capabilities(stochastic: bool, entropy: bool) -> None:
    caps = commhooks.compressor(f"adaptive:stochastic={stochastic},entropy={entropy}").capabilities
    assert caps.kind == Kind.QUANTIZER and not caps.summable and caps.rounds == 1
    assert not caps.static_size and not caps.unbiased and caps.stateful


def test_spec_string_and_registry() -> None:
    assert "adaptive" in commhooks.available()
    c = commhooks.compressor("adaptive:budget=3.5,min_bits=2,max_bits=6,decay=0.5,stochastic=1")
    assert isinstance(c, Adaptive)
    assert c.config == AdaptiveConfig(
        budget=3.5, min_bits=2, max_bits=6, decay=0.5, stochastic=True
    )
    assert commhooks.compressor(c.config.spec()).config == c.config


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"budget": 0.5}, "budget"),
        ({"budget": 8.5}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"budget": 7.0, "max_bits": 6}, "budget"),
        ({"budget": 2.0, "min_bits": 3}, "budget"),
        ({"min_bits": 0}, "min_bits"),
        ({"max_bits": 9}, "max_bits"),
        ({"min_bits": 5, "max_bits": 4, "budget": 4.5}, "min_bits"),
        ({"decay": 1.0}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"stochastic": "yes"}, "stochastic"),
        ({"entropy": 0}, "entropy"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdaptiveConfig(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stochastic", [False, True])
def test_cuda_round_trip(stochastic: bool) -> None:
    c = commhooks.compressor(f"adaptive:stochastic={stochastic}")
    cpu = commhooks.compressor(f"adaptive:stochastic={stochastic}")
    for step in range(3):
        x = torch.randn(257, 33, device="cuda") * (step + 1)
        payload, ctx = c.compress(x, "w")
        cpu_payload, _ = cpu.compress(x.cpu(), "w")
        assert all(t.device.type == "cuda" for t in payload)
        y = c.decompress(payload, ctx)
        assert y.device.type == "cuda" and y.shape == x.shape and y.dtype == x.dtype
        # Same statistics, so the same bits as on the CPU (up to reduction-order rounding).
        assert bits_of(payload) == bits_of(cpu_payload)
        torch.testing.assert_close(payload[1].cpu(), cpu_payload[1], rtol=1e-5, atol=1e-6)
        lo, hi = payload[1].tolist()
        assert float(y.min()) >= lo - 1e-5 and float(y.max()) <= hi + 1e-5
    bad = torch.randn(100, device="cuda")
    bad[3] = float("inf")
    before = c.state_dict()["stats"]
    assert not torch.isfinite(c.decompress(*c.compress(bad, "w"))).all()
    assert c.state_dict()["stats"] == before
