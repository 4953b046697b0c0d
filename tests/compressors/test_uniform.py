"""Uniform quantization: half-step error, unbiased stochastic rounding, exact bytes, and the
two-round shared-scale all-reduce (headroom, overflow, non-finite agreement)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.compressors.base import Exchange, Kind, ReduceOp, compute_dtype
from commhooks.compressors.uniform import Uniform, UniformConfig, shared_levels
from commhooks.testing import simulate_allreduce

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def per_element(per_chunk: torch.Tensor, chunk: int, n: int) -> torch.Tensor:
    return per_chunk.repeat_interleave(chunk)[:n]


def min_max_bound(payload: tuple, n: int, cfg: UniformConfig, dtype: torch.dtype) -> torch.Tensor:
    """step/2 plus the rounding of the decode arithmetic and of the cast to ``dtype``."""
    scales = payload[1]
    lo, step = (per_element(t, cfg.chunk, n) for t in scales.double().view(-1, 2).unbind(1))
    mag = lo.abs() + (lo + step * (2**cfg.bits - 1)).abs()
    out = torch.finfo(dtype)
    rounding = 4 * torch.finfo(scales.dtype).eps * mag + out.eps * mag + out.tiny * out.eps
    return step / 2 + rounding


# -- min-max mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,chunk", [(8, 2048), (4, 100), (1, 7), (3, 1)])
def test_deterministic_error_is_at_most_half_a_step(
    dtype: torch.dtype, bits: int, chunk: int
) -> None:
    cfg = UniformConfig(bits=bits, chunk=chunk)
    c = Uniform(cfg)
    gen = torch.Generator().manual_seed(bits)
    for shape in SHAPES:
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        payload, ctx = c.compress(x)
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel() == 0:
            assert payload == ()
            continue
        err = (y.double() - x.double()).reshape(-1).abs()
        assert (err <= min_max_bound(payload, x.numel(), cfg, dtype)).all()
        # Deterministic: the same input gives the same bytes.
        assert all(torch.equal(a, b) for a, b in zip(payload, c.compress(x)[0]))


def test_levels_hit_the_chunk_extremes_and_constants_are_exact() -> None:
    c = commhooks.compressor("uniform:bits=2,chunk=4")
    x = torch.tensor([-1.0, 0.0, 1.4, 2.0, 7.0, 7.0, 7.0, 7.0, 0.0, 0.0])
    y = c.decompress(*c.compress(x))
    # Chunk 1: levels -1, 0, 1, 2. Chunk 2 is constant. Chunk 3 is zero padded, still exact.
    torch.testing.assert_close(y, torch.tensor([-1.0, 0, 1, 2, 7, 7, 7, 7, 0, 0]))


def test_fp64_keeps_fp64_scales() -> None:
    x = torch.randn(5000, dtype=torch.float64) * 1e-3 + 1.0
    c = commhooks.compressor("uniform:bits=8,chunk=1000")
    payload, ctx = c.compress(x)
    assert payload[1].dtype == torch.float64
    y = c.decompress(payload, ctx)
    assert (y - x).abs().max() <= min_max_bound(payload, 5000, c.config, torch.float64).max()


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> None:
    """Linear statistics of the per-element mean error, each within 5 standard errors.

    Each statistic sums many independent errors, so it is close to normal even where single
    elements are far from it (rarely-rounded-up elements).
    """
    trials = samples.shape[0]
    err = samples.double().mean(0) - x.double()
    gen = torch.Generator().manual_seed(0)
    flips = torch.randint(0, 2, x.shape, generator=gen).double() * 2 - 1
    for w in (torch.ones_like(err), torch.sign(x.double()), flips):
        stat = (w * err).sum()
        se = ((w.square() * var.double()).sum() / trials).sqrt()
        slack = 1e-6 * x.double().abs().sum()  # fp32 arithmetic in the encoder/decoder
        assert stat.abs() <= 5 * se + slack, (float(stat), float(se))


@pytest.mark.parametrize("shared", [False, True])
def test_stochastic_rounding_is_unbiased(shared: bool) -> None:
    n, trials, bits = 1000, 2000, 2
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    c = commhooks.compressor(f"uniform:bits={bits},chunk={n},stochastic=true,shared_scale={shared}")
    # One call on trials stacked copies, one chunk each: every row has the same scale and
    # independent rounding noise.
    payload, ctx = c.compress(x.repeat(trials))
    samples = c.decompress(payload, ctx).view(trials, n)
    if shared:
        step = x.abs().max() / shared_levels(bits, 1)[0]
        q = x / step
    else:
        step = (x.max() - x.min()) / (2**bits - 1)
        q = (x - x.min()) / step
    p = q - q.floor()
    # Only the two levels around each x occur.
    assert ((samples - x).abs() <= step * (1 + 1e-5)).all()
    assert_unbiased(samples, x, step.square() * p * (1 - p))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n,chunk", [(1, 2048), (1000, 64), (4097, 2048), (12345, 1000)])
def test_payload_bytes_are_exact(bits: int, n: int, chunk: int) -> None:
    c = commhooks.compressor(f"uniform:bits={bits},chunk={chunk}")
    chunks = math.ceil(n / chunk)
    for dtype, scale_bytes in ((torch.float32, 4), (torch.bfloat16, 4), (torch.float64, 8)):
        payload, _ = c.compress(torch.randn(n).to(dtype))
        assert payload[0].dtype == torch.uint8
        assert c.nbytes(payload) == math.ceil(n * bits / 8) + 2 * chunks * scale_bytes


def test_entropy_coding_decodes_the_same_levels() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(5))
    plain = commhooks.compressor("uniform:bits=4")
    coded = commhooks.compressor("uniform:bits=4,entropy=true")
    assert plain.capabilities.static_size and not coded.capabilities.static_size
    payload, ctx = coded.compress(x)
    torch.testing.assert_close(
        coded.decompress(payload, ctx), plain.decompress(*plain.compress(x)), rtol=0, atol=0
    )
    # Gaussian data through min-max levels is peaked: the coder must pay off.
    assert coded.nbytes(payload) < plain.nbytes(plain.compress(x)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("spec", ["uniform", "uniform:bits=1,chunk=3", "uniform:shared_scale=true"])
def test_non_finite_input_gives_non_finite_output(spec: str, bad: float) -> None:
    c = commhooks.compressor(spec)
    for dtype in DTYPES:
        x = torch.randn(100).to(dtype)
        x[37] = bad
        y = c.decompress(*c.compress(x))
        assert not torch.isfinite(y[37]), f"{spec} {dtype} hid {bad}"


finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)
# Finite values stay well inside fp32's range: a chunk whose range itself overflows fp32 (values
# near +-3.4e38) decodes as non-finite, which GradScaler treats as an overflow (documented).
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.one_of(finite, finite, finite, non_finite), min_size=1, max_size=300),
    bits=st.integers(1, 8),
    chunk=st.integers(1, 64),
    stochastic=st.booleans(),
)
def test_hypothesis_inputs(values: list[float], bits: int, chunk: int, stochastic: bool) -> None:
    cfg = UniformConfig(bits=bits, chunk=chunk, stochastic=stochastic)
    c = Uniform(cfg)
    x = torch.tensor(values, dtype=torch.float32)
    payload, ctx = c.compress(x)
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).all()
        return
    assert torch.isfinite(y).all()
    bound = min_max_bound(payload, x.numel(), cfg, torch.float32)
    if stochastic:
        bound = 2 * bound  # either neighbouring level
    assert ((y.double() - x.double()).abs() <= bound).all()


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.one_of(finite, finite, finite, non_finite), min_size=1, max_size=300),
    bits=st.integers(2, 8),
    chunk=st.integers(1, 64),
)
def test_hypothesis_shared_scale_single_rank(values: list[float], bits: int, chunk: int) -> None:
    c = Uniform(UniformConfig(bits=bits, chunk=chunk, shared_scale=True))
    x = torch.tensor(values, dtype=torch.float32)
    (codes, step), ctx = c.compress(x)
    y = c.decompress((codes, step), ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).all()
        return
    level = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= level
    bound = per_element(step.double(), chunk, x.numel()) * (0.5 + 1e-5)
    # The step is stored as float32: a subnormal one is off by up to half a subnormal ulp
    # (2**-150), which a code of up to ``level`` multiplies.
    slack = 1e-6 * x.double().abs() + level * 2.0**-150
    assert ((y.double() - x.double()).abs() <= bound + slack).all()


# -- shared-scale mode ----------------------------------------------------------------------------


def chunk_absmax_over_ranks(flat: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """Per element: the max |x| over every rank's copy of its chunk (the agreed scale)."""
    n = flat[0].numel()
    m = torch.stack([f.abs() for f in flat]).amax(0)
    rows = torch.nn.functional.pad(m, (0, (-n) % chunk)).view(-1, chunk)
    return per_element(rows.amax(1), chunk, n)


def run_exchange(spec: str, inputs: list[list[torch.Tensor]]) -> list[Exchange]:
    world = len(inputs)
    keys = [f"t{i}" for i in range(len(inputs[0]))]
    ranks = [commhooks.compressor(spec) for _ in range(world)]
    for r, c in enumerate(ranks):
        c.set_seed(r)
    exchanges = [c.exchange(x, keys, world) for c, x in zip(ranks, inputs)]
    rounds = simulate_allreduce(exchanges)
    _, dtype = shared_levels(ranks[0].config.bits, world)
    assert [(m.op, [t.dtype for t in m.tensors]) for m in rounds] == [
        (ReduceOp.MAX, [torch.float32]),
        (ReduceOp.SUM, [dtype]),
    ]
    return exchanges


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("bits,chunk", [(8, 2048), (4, 10), (2, 1)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_shared_scale_exchange_sums_codes(
    world: int, bits: int, chunk: int, stochastic: bool
) -> None:
    spec = f"uniform:bits={bits},chunk={chunk},shared_scale=true,stochastic={stochastic}"
    gen = torch.Generator().manual_seed(world * 10 + bits)
    shapes_dtypes = [((7, 13), torch.float32), ((30,), torch.float16), ((1,), torch.float64)]
    inputs = [
        [(torch.randn(s, generator=gen) * (r + 1)).to(d) for s, d in shapes_dtypes]
        for r in range(world)
    ]
    exchanges = run_exchange(spec, inputs)
    level, _ = shared_levels(bits, world)
    results = [ex.result() for ex in exchanges]
    for i, (shape, dtype) in enumerate(shapes_dtypes):
        out = results[0][i]
        assert out.shape == shape and out.dtype == compute_dtype(dtype)
        for other in results[1:]:
            assert torch.equal(other[i], out)  # every rank decodes the same sum
        locals_ = [ex.local()[i].double() for ex in exchanges]
        # Equal up to the rounding of each decoded tensor to its dtype (fp16 here and there).
        tol = world * torch.finfo(dtype).eps * float(sum(t.abs() for t in locals_).max())
        torch.testing.assert_close(out.double(), sum(locals_), rtol=0, atol=tol)
        # Against the true sum: each rank is off by < 1 step (1/2 if deterministic).
        flat = [x[i].double().reshape(-1) for x in inputs]
        step = chunk_absmax_over_ranks(flat, chunk) / level
        per_rank = step * (1.0 if stochastic else 0.5)
        slack = torch.finfo(dtype).eps * (sum(f.abs() for f in flat) + world * step * level)
        err = (out.double().reshape(-1) - sum(flat)).abs()
        assert (err <= world * per_rank * (1 + 1e-6) + slack).all()
        for loc, f in zip(locals_, flat):
            assert ((loc.reshape(-1) - f).abs() <= per_rank * (1 + 1e-6) + slack).all()


def test_shared_levels_leave_headroom_for_the_sum() -> None:
    assert shared_levels(8, 1) == (127, torch.int8)
    assert shared_levels(8, 2) == (63, torch.int8)
    assert shared_levels(2, 100) == (1, torch.int8)
    assert shared_levels(8, 64) == (1, torch.int8)
    assert shared_levels(8, 128) == (127, torch.int16)
    assert shared_levels(4, 1000) == (7, torch.int16)
    assert shared_levels(8, 40000) == (127, torch.int32)
    for bits in range(2, 9):
        for world in (1, 2, 3, 5, 64, 127, 128, 129, 300, 32767, 32768, 10**6):
            level, dtype = shared_levels(bits, world)
            assert 1 <= level <= 2 ** (bits - 1) - 1
            assert world * level <= torch.iinfo(dtype).max


@pytest.mark.parametrize("world", [4, 130])
def test_worst_case_sum_does_not_overflow(world: int) -> None:
    """Every rank at +absmax in one chunk and -absmax in the other: codes +-L summed world
    times. A wrong headroom would wrap around in the wire dtype."""
    x = torch.tensor([3.0, 1.0, -3.0, -0.5])
    exchanges = run_exchange("uniform:bits=8,chunk=2,shared_scale=true", [[x]] * world)
    out = exchanges[0].result()[0]
    assert out[0] == world * 3.0 and out[2] == -world * 3.0
    level, _ = shared_levels(8, world)
    assert ((out - world * x).abs() <= world * 3.0 / level / 2 + 1e-4).all()


def test_int32_codes_for_huge_worlds() -> None:
    c = commhooks.compressor("uniform:bits=8,shared_scale=true")
    ex = c.exchange([torch.randn(10)], ["w"], world_size=40000)
    first = ex.message()
    assert first is not None
    ex.receive(list(first.tensors))
    second = ex.message()
    assert second is not None and second.tensors[0].dtype == torch.int32
    assert second.op == ReduceOp.SUM and second.tensors[0].abs().max() <= 127


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_shared_scale_non_finite_reaches_every_rank(bad: float) -> None:
    xs = [torch.randn(50), torch.randn(50)]
    xs[1][7] = bad
    exchanges = run_exchange("uniform:chunk=10,shared_scale=true", [[x] for x in xs])
    for ex in exchanges:
        assert not torch.isfinite(ex.result()[0][7])
        assert not torch.isfinite(ex.local()[0][7])
        assert torch.isfinite(ex.result()[0][10:]).all()  # other chunks unaffected


def test_shared_scale_single_rank_payload_and_summed_payloads() -> None:
    c = commhooks.compressor("uniform:bits=8,chunk=16,shared_scale=true")
    gen = torch.Generator().manual_seed(9)
    x1, x2 = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    # Make every chunk's absmax the same on both, so the steps agree.
    for x in (x1, x2):
        x[::16] = 5.0
    (c1, s1), ctx = c.compress(x1)
    (c2, s2), _ = c.compress(x2)
    assert c1.dtype == torch.int8 and c1.numel() == 40 and int(c1.abs().max()) == 127
    assert torch.equal(s1, s2) and s1.numel() == 3
    assert c.nbytes((c1, s1)) == 40 + 3 * 4
    torch.testing.assert_close(s1, torch.full((3,), 5.0 / 127))
    y1 = c.decompress((c1, s1), ctx)
    assert ((y1 - x1).abs() <= s1[0] / 2 + 1e-6).all()
    # Codes summed (in a wider type, as single-rank codes use all of int8) decode to the sum.
    summed = c.decompress((c1.to(torch.int16) + c2, s1), ctx)
    torch.testing.assert_close(summed, y1 + c.decompress((c2, s2), ctx))


def test_exchange_protocol() -> None:
    c = commhooks.compressor("uniform:shared_scale=true")
    ex = c.exchange([torch.randn(5)], ["w"], 2)
    with pytest.raises(RuntimeError):
        ex.result()
    with pytest.raises(RuntimeError):
        ex.local()
    empty = c.exchange([], [], 2)
    assert empty.message() is None and empty.result() == [] and empty.local() == []
    with pytest.raises(ValueError, match="world_size"):
        c.exchange([torch.randn(5)], ["w"], 0)
    with pytest.raises(ValueError, match="not summable"):
        commhooks.compressor("uniform").exchange([torch.randn(5)], ["w"], 2)


def test_capabilities() -> None:
    caps = commhooks.compressor("uniform").capabilities
    assert caps.kind == Kind.QUANTIZER and not caps.summable and caps.static_size
    assert not caps.unbiased and caps.rounds == 1
    assert commhooks.compressor("uniform:stochastic=true").capabilities.unbiased
    shared = commhooks.compressor("uniform:shared_scale=true").capabilities
    assert shared.summable and shared.rounds == 2 and shared.static_size
    assert not commhooks.compressor("uniform:entropy=true").capabilities.static_size


# -- configuration ---------------------------------------------------------------------------------


def test_spec_strings_and_registry() -> None:
    assert "uniform" in commhooks.available()
    c = commhooks.compressor("uniform:bits=4,chunk=1024,stochastic=true,seed=3")
    assert c.config == UniformConfig(bits=4, chunk=1024, stochastic=True, seed=3)
    assert commhooks.compressor(c.config.spec()).config == c.config


@pytest.mark.parametrize(
    "spec,field",
    [
        ("uniform:bits=0", "bits"),
        ("uniform:bits=9", "bits"),
        ("uniform:bits=2.5", "bits"),
        ("uniform:chunk=0", "chunk"),
        ("uniform:stochastic=maybe", "stochastic"),
        ("uniform:entropy=2", "entropy"),
        ("uniform:shared_scale=yes please", "shared_scale"),
        ("uniform:bits=1,shared_scale=true", "bits"),
        ("uniform:seed=x", "seed"),
    ],
)
def test_bad_config_names_the_field(spec: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        commhooks.compressor(spec)


def test_shared_scale_with_entropy_names_both_fields() -> None:
    with pytest.raises(ValueError, match="shared_scale") as info:
        UniformConfig(shared_scale=True, entropy=True)
    assert "entropy" in str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "spec", ["uniform:bits=4", "uniform:stochastic=true", "uniform:bits=6,shared_scale=true"]
)
def test_cuda_matches_cpu(spec: str) -> None:
    c = commhooks.compressor(spec)
    x = torch.randn(257, 33)
    payload, ctx = c.compress(x.cuda())
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape
    if not c.config.stochastic:
        torch.testing.assert_close(y.cpu(), c.decompress(*c.compress(x)))
    if c.capabilities.summable:
        exchanges = [commhooks.compressor(spec).exchange([x.cuda()], ["w"], 2) for _ in range(2)]
        simulate_allreduce(exchanges)
        torch.testing.assert_close(exchanges[0].result()[0], 2 * y)


@pytest.mark.parametrize(
    ("spec", "lo", "hi"),
    [
        ("uniform:bits=1", 2.5, 3.0),
        ("uniform:bits=1,stochastic=true", 3.0, 3.6),
        ("sign", 0.5, 0.7),
    ],
)
def test_one_bit_error_is_as_documented(spec: str, lo: float, hi: float) -> None:
    """One bit keeps only the chunk's extremes: on Gaussian values its relative error is
    worse than sending zeros (1.0), as UniformConfig's docstring says; sign is the one-bit
    choice it points to."""
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    c = commhooks.compressor(spec)
    payload, ctx = c.compress(g, key="k")
    err = float((c.decompress(payload, ctx) - g).norm() / g.norm())
    assert lo < err < hi, (spec, err)
