"""The fused native kernels against the torch path they replace: same bytes, same decodes,
the exact error-feedback residual, and the torch path's handling of non-finite input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import commhooks
from commhooks import native
from commhooks.compressors.base import Compressor
from commhooks.feedback import fused_compress

# Skipped only without a compiler; with one, a failed build fails test_the_kernels_build.


def test_the_kernels_build():
    assert native.lib() is not None


SIZES = [native.MIN_NUMEL, native.MIN_NUMEL + 5, 100_003, 300_007]  # the last: threaded


SPECS = [
    "sign",
    "sign:chunk=2048",
    "sign:chunk=1000",  # chunks that end inside a byte of sign bits
    "uniform",
    "uniform:bits=4",
    "uniform:bits=2",
    "uniform:bits=1",
    "uniform:bits=4,chunk=1000",
    "uniform:bits=8,chunk=1000000",  # one padded chunk larger than the tensor
    "nonuniform",  # log levels, 4 bits
    "nonuniform:levels=mulaw,bits=2",
    "nonuniform:levels=mulaw,bits=8,chunk=1000",
]


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMHOOKS_NATIVE", "0")


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)  # magnitudes vary along it
    x[:7] = 0.0  # zeros (sign: +) and a constant run
    return x


def _payload_equal(c: Compressor, a: tuple, b: tuple) -> None:
    # Bits/codes must match exactly; scales that come from a mean may differ in the last place
    # (the kernel sums in double).
    assert torch.equal(a[0], b[0])
    if c.config.name == "sign":
        assert_close(a[1], b[1], rtol=1e-6, atol=0)
    else:
        assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_compress_and_decompress_match_torch(spec, n, monkeypatch):
    x = _data(n, 0)
    c = commhooks.compressor(spec)
    fast, ctx = c.compress(x)
    fast_out = c.decompress(fast, ctx)
    with monkeypatch.context() as m:
        _torch_path(m)
        slow, _ = c.compress(x)
        slow_out = c.decompress(slow, ctx)
        cross = c.decompress(fast, ctx)  # the torch decoder reads the kernel's bytes
    _payload_equal(c, fast, slow)
    assert torch.equal(fast_out, cross)
    assert_close(fast_out, slow_out, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_aggregate_adds_decodes(spec):
    c = commhooks.compressor(spec)
    payloads, ctx = [], None
    for seed in range(3):
        p, ctx = c.compress(_data(50_000, seed))
        payloads.append(p)
    expect = sum(c.decompress(p, ctx) for p in payloads)
    assert torch.equal(c.aggregate(payloads, ctx), expect)


@pytest.mark.parametrize("spec", SPECS)
def test_fused_feedback_residual_is_exact(spec, monkeypatch):
    """c = g + e; the fused step's new residual is exactly c - decode(payload), as the torch
    path computes it, and the payload matches the torch path's for the same c."""
    n = 270_001
    g, e0 = _data(n, 1), _data(n, 2) * 0.01
    c = commhooks.compressor(spec)
    e = e0.clone()
    payload, ctx = fused_compress(c, g, e)
    comp = g + e0
    assert torch.equal(e, comp - c.decompress(payload, ctx))
    with monkeypatch.context() as m:
        _torch_path(m)
        assert fused_compress(c, g, e0.clone()) is None  # no kernel: the caller's way
        slow, _ = c.compress(comp)
    _payload_equal(c, payload, slow)


@pytest.mark.parametrize("spec", ["sign", "uniform:bits=4"])
def test_error_feedback_same_with_and_without_kernels(spec, monkeypatch):
    fast = commhooks.ErrorFeedback(spec)
    with monkeypatch.context() as m:
        _torch_path(m)
        slow = commhooks.ErrorFeedback(spec)
        slow_steps = [slow.compress("w", _data(40_000, s))[0] for s in range(4)]
        slow_res = slow.residual("w")
    for s, ref in enumerate(slow_steps):
        got, _ = fast.compress("w", _data(40_000, s))
        _payload_equal(commhooks.compressor(spec), got, ref)
    assert_close(fast.residual("w"), slow_res, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
@pytest.mark.parametrize("spec", ["sign", "uniform:bits=8", "nonuniform"])
def test_non_finite_or_huge_input_takes_the_torch_path(spec, bad):
    """The kernel refuses (residual untouched) and error feedback's torch path sends the NaN/inf
    on to GradScaler while keeping the old residual."""
    g = _data(30_000, 3)
    g[123] = bad
    c = commhooks.compressor(spec)
    e = torch.full_like(g, 0.5)
    assert fused_compress(c, g, e) is None
    assert torch.equal(e, torch.full_like(g, 0.5))
    ef = commhooks.ErrorFeedback(spec)
    ef.compress("w", _data(30_000, 4))
    kept = ef.residual("w").clone()
    payload, ctx = ef.compress("w", g)
    if bad != 3e38:
        assert not torch.isfinite(c.decompress(payload, ctx)).all()
        assert torch.equal(ef.residual("w"), kept)


def test_state_dict_is_a_snapshot():
    """Fused kernels update residuals in place; a saved state must not change afterwards, and
    a loaded one must not be written through."""
    ef = commhooks.ErrorFeedback("sign")
    ef.compress("w", _data(30_000, 5))
    state = ef.state_dict()
    saved = state["residuals"]["w"].clone()
    ef.compress("w", _data(30_000, 6))
    assert torch.equal(state["residuals"]["w"], saved)
    other = commhooks.ErrorFeedback("sign")
    other.load_state_dict(state)
    other.compress("w", _data(30_000, 7))
    assert torch.equal(state["residuals"]["w"], saved)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("COMMHOOKS_NATIVE", "0")
    assert native.lib() is None
    assert not native.usable(torch.zeros(native.MIN_NUMEL))


def test_small_tensors_stay_on_the_torch_path():
    assert not native.usable(torch.zeros(native.MIN_NUMEL - 1))
    assert not native.usable(torch.zeros(native.MIN_NUMEL, dtype=torch.float64))
    assert native.usable(torch.zeros(native.MIN_NUMEL))


# -- adaptive: a grid over running ranges, bit widths chosen per call


@pytest.mark.parametrize("spec", ["adaptive", "adaptive:budget=7,min_bits=3"])
@pytest.mark.parametrize("n", [native.MIN_NUMEL, 300_007])
def test_adaptive_matches_the_torch_path(spec, n, monkeypatch):
    """Over steps of three keys whose scales differ (so the bit widths vary, plane-packed ones
    among them): the same payloads, decodes, residuals and running statistics."""

    def steps(ef: commhooks.ErrorFeedback) -> list:
        out = []
        for s in range(9):
            key = f"w{s % 3}"
            x = _data(n, s) * 10.0 ** (s % 3 - 1) * (1 + s // 3)
            p, ctx = ef.compress(key, x)
            out.append((p, ef.compressor.decompress(p, ctx), ef.residual(key).clone()))
        return out

    fast = commhooks.ErrorFeedback(spec)
    got = steps(fast)
    with monkeypatch.context() as m:
        _torch_path(m)
        slow = commhooks.ErrorFeedback(spec)
        want = steps(slow)
    for (p1, d1, e1), (p2, d2, e2) in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))
        assert torch.equal(d1, d2) and torch.equal(e1, e2)
    assert len({int(p[0][0]) for p, _, _ in got}) >= 3  # several widths were exercised
    for k in ("w0", "w1", "w2"):
        a, b = fast.compressor.stats(k), slow.compressor.stats(k)
        assert (a.lo, a.hi, a.numel) == (b.lo, b.hi, b.numel)
        assert a.var == pytest.approx(b.var, rel=1e-5)  # fp64 sums against torch's var()


def test_adaptive_variance_survives_a_large_mean():
    """A mean 1e4 times the spread: the pivoted sums keep the variance (and so the bit width)
    where E[c^2] - E[c]^2 would cancel in fp32 lanes."""
    x = _data(100_003, 8) * 1e-3 + 50.0
    c = commhooks.compressor("adaptive")
    c.compress(x, "w")
    assert c.stats("w").var == pytest.approx(float(x.double().var(correction=0)), rel=1e-4)


@pytest.mark.parametrize("spec", ["nonuniform", "nonuniform:levels=mulaw,bits=2"])
def test_nonuniform_zero_chunks_scale_is_positive_zero(spec, monkeypatch):
    x = _data(30_000, 9)
    x[:4096] = 0.0  # two all-zero chunks
    c = commhooks.compressor(spec)
    fast, ctx = c.compress(x)
    with monkeypatch.context() as m:
        _torch_path(m)
        slow, _ = c.compress(x)
    assert torch.equal(fast[1].view(torch.int32), slow[1].view(torch.int32))  # +0, not -0
    assert torch.equal(
        c.decompress(fast, ctx).view(torch.int32)[:4096], torch.zeros(4096, dtype=torch.int32)
    )


def test_adaptive_non_finite_input_leaves_statistics_alone():
    c = commhooks.compressor("adaptive")
    g = _data(30_000, 3)
    c.compress(g, "w")
    before = c.stats("w")
    g[99] = float("nan")
    e = torch.full_like(g, 0.5)
    assert fused_compress(c, g, e, "w") is None
    assert torch.equal(e, torch.full_like(g, 0.5)) and c.stats("w") == before
    p, ctx = c.compress(g, "w")  # the torch path: NaN range, statistics kept
    assert torch.isnan(c.decompress(p, ctx)).all() and c.stats("w") == before


# -- stochastic quantizers: the kernel draws its own noise, so the checks are structural and
# statistical rather than byte-equal to the torch path.

STOCHASTIC = [
    "ternary",
    "qsgd",
    "qsgd:levels=1",  # alphabet 3: five symbols a byte
    "qsgd:levels=2,chunk=1000",  # alphabet 5: three a byte; chunks end inside a group
    "qsgd:levels=127,norm=max",  # alphabet 255: a byte each
    "qsgd:levels=7,chunk=300",
    "qsgd:levels=3",  # alphabet 7: 3 bits as planes of 2 and 1
    "qsgd:levels=50,chunk=1000",  # alphabet 101: 7 bits, planes of 4, 2 and 1
]


UNIFORM_STOCHASTIC = [
    "uniform:stochastic=true",
    "uniform:bits=4,stochastic=true",
    "uniform:bits=2,stochastic=true,chunk=1000",  # chunks that end inside a byte
    "uniform:bits=1,stochastic=true,chunk=4096",
]


def _symbols(c: Compressor, payload: tuple, n: int) -> torch.Tensor:
    from commhooks.coding.symbols import decode_symbols

    alphabet = 3 if c.config.name == "ternary" else 2 * c.config.levels + 1
    return decode_symbols(payload[0], alphabet, n), alphabet


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", STOCHASTIC)
def test_stochastic_payload_is_the_torch_layout(spec, n, monkeypatch):
    """The bytes are ``pack_symbols`` of valid symbols, decode alike by either decoder, and
    every element lands on one of the two levels around it."""
    from commhooks.coding.symbols import encode_symbols

    x = _data(n, 8)
    c = commhooks.compressor(spec)
    payload, ctx = c.compress(x)
    assert c.kernels.decodes(payload, ctx)
    symbols, alphabet = _symbols(c, payload, n)
    assert int(symbols.min()) >= 0 and int(symbols.max()) < alphabet
    assert torch.equal(encode_symbols(symbols, alphabet), payload[0])  # padding included
    fast = c.decompress(payload, ctx)
    with monkeypatch.context() as m:
        _torch_path(m)
        assert torch.equal(c.decompress(payload, ctx), fast)
        ref, _ = c.compress(x)
    assert_close(payload[1], ref[1], rtol=1e-5, atol=0)  # the norms / scale
    levels = 1 if c.config.name == "ternary" else c.config.levels
    chunk = n if c.config.name == "ternary" else c.config.chunk
    step = (payload[1] / levels).repeat_interleave(chunk)[:n]
    r = x.abs() / step
    k = (fast.abs() / step).round()  # the level sent
    assert bool(((k >= (r - 1e-3).floor()) & (k <= (r + 1e-3).ceil())).all())
    assert bool((torch.sign(fast) * torch.sign(x) >= 0).all())  # never the wrong sign


@pytest.mark.parametrize("spec", ["ternary", "qsgd:levels=2", "qsgd"])
def test_stochastic_kernels_are_unbiased(spec):
    x = _data(20_000, 9)
    c = commhooks.compressor(spec)
    chunk = x.numel() if spec == "ternary" else c.config.chunk
    levels = 1 if spec == "ternary" else c.config.levels
    step = (c.compress(x)[0][1] / levels).repeat_interleave(chunk)[: x.numel()]
    _assert_unbiased(c, x, step, 400)


def _assert_unbiased(c: Compressor, x: torch.Tensor, step: torch.Tensor, k: int) -> None:
    """The mean of ``k`` decodes is ``x``: per-element standard error is at most the step /
    (2 sqrt(k)); the average error, normalised by the step, fails for a bias of a tenth of
    a step."""
    mean = torch.zeros_like(x)
    for _ in range(k):
        p, ctx = c.compress(x)
        mean += c.decompress(p, ctx) / k
    assert float(((mean - x) / step).mean().abs()) < 0.01
    assert float(((mean - x) / step).abs().max()) < 6 / (2 * k**0.5) + 1e-3


@pytest.mark.parametrize("spec", STOCHASTIC + UNIFORM_STOCHASTIC)
def test_stochastic_feedback_residual_and_aggregate(spec):
    n = 270_001
    g, e0 = _data(n, 10), _data(n, 11) * 0.01
    c = commhooks.compressor(spec)
    e = e0.clone()
    payload, ctx = fused_compress(c, g, e)
    assert torch.equal(e, (g + e0) - c.decompress(payload, ctx))
    payloads = [payload, c.compress(g)[0], c.compress(e0)[0]]
    expect = sum(c.decompress(p, ctx) for p in payloads)
    assert torch.equal(c.aggregate(payloads, ctx), expect)


def test_stochastic_draws_follow_the_generator():
    """Same seed and key: the same bytes (a resumed run redraws alike); the next call draws
    anew."""
    x = _data(40_000, 12)
    a, b = commhooks.compressor("qsgd:seed=3"), commhooks.compressor("qsgd:seed=3")
    pa, _ = a.compress(x, key="w")
    pb, _ = b.compress(x, key="w")
    assert torch.equal(pa[0], pb[0])
    assert not torch.equal(a.compress(x, key="w")[0][0], pa[0])
    assert not torch.equal(commhooks.compressor("qsgd:seed=4").compress(x, key="w")[0][0], pa[0])


@pytest.mark.parametrize(
    "spec",
    [
        "qsgd:entropy=true",
        "nonuniform:entropy=true",
        "nonuniform:levels=quantile",  # fitted levels: the torch path fits and sends them
        "nonuniform:stochastic=true",
        "nonuniform:bits=3",  # bit planes
        "adaptive:stochastic=true",
        "adaptive:entropy=true",
    ],
)
def test_configs_without_kernels_keep_the_torch_path(spec):
    c = commhooks.compressor(spec)
    p, ctx = c.compress(_data(30_000, 13))
    assert not c.kernels.decodes(p, ctx)
    assert fused_compress(c, _data(30_000, 13), torch.zeros(30_000)) is None


def _levels(payload: tuple, chunk: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, step = payload[1].view(-1, 2).unbind(1)
    return lo.repeat_interleave(chunk)[:n], step.repeat_interleave(chunk)[:n]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", UNIFORM_STOCHASTIC)
def test_stochastic_uniform_is_the_torch_layout(spec, n, monkeypatch):
    """The torch path's scales and byte layout (its decoder reads the kernel's bytes), and
    every element on one of the two levels around it."""
    x = _data(n, 14)
    c = commhooks.compressor(spec)
    payload, ctx = c.compress(x)
    assert c.kernels.decodes(payload, ctx)
    fast = c.decompress(payload, ctx)
    with monkeypatch.context() as m:
        _torch_path(m)
        assert torch.equal(c.decompress(payload, ctx), fast)
        ref, _ = c.compress(x)
    assert torch.equal(payload[1], ref[1])
    assert payload[0].shape == ref[0].shape
    lo, step = _levels(payload, c.config.chunk, n)
    q, k = (x - lo) / step, ((fast - lo) / step).round()
    assert bool(((k >= (q - 1e-3).floor()) & (k <= (q + 1e-3).ceil())).all())


@pytest.mark.parametrize("spec", ["uniform:bits=2,stochastic=true", "uniform:stochastic=true"])
def test_stochastic_uniform_is_unbiased(spec):
    x = _data(20_000, 15)
    c = commhooks.compressor(spec)
    _, step = _levels(c.compress(x)[0], c.config.chunk, x.numel())
    _assert_unbiased(c, x, step, 400)
