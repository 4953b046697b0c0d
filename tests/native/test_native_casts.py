"""The fused fp16/bf16 error-feedback exchange against the op-by-op one: the same wire values,
results, local contributions and residuals, bit for bit, and the same handling of overflow."""

from __future__ import annotations

import pytest
import torch

from commhooks import native
from commhooks.compressors.cast import FusedCastExchange
from commhooks.feedback import ErrorFeedback
from commhooks.testing import simulate_allreduce

# A 2-D tensor below the kernels' size (the torch formulas), one at it, one split across threads
# with a tail that is not a multiple of the 8-wide conversion.
SHAPES = [(300, 7), (native.MIN_NUMEL,), (300_007,)]
KEYS = ["small", "edge", "large"]


def _grads(world: int, step: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 * step + world)
    return [
        [
            torch.randn(s, generator=gen) * (1.0 + step) * 10.0 ** (i - 1)
            for i, s in enumerate(SHAPES)
        ]
        for _ in range(world)
    ]


def _run(efs: list[ErrorFeedback], grads: list[list[torch.Tensor]]):
    exchanges = [ef.exchange(KEYS, g, len(efs)) for ef, g in zip(efs, grads)]
    simulate_allreduce(exchanges)
    return exchanges, [ex.result() for ex in exchanges], [ex.local() for ex in exchanges]


def _assert_same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "fp16:prescale=false"])
@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_fused_exchange_matches_op_by_op(spec, world, decay, monkeypatch):
    fused = [ErrorFeedback(spec, decay=decay) for _ in range(world)]
    plain = [ErrorFeedback(spec, decay=decay) for _ in range(world)]
    for step in range(4):
        grads = _grads(world, step)
        exchanges, results, locals_ = _run(fused, grads)
        # A key's first step has no residual to update in place: op by op, as compress() does.
        assert isinstance(exchanges[0], FusedCastExchange) == (step > 0)
        with monkeypatch.context() as m:
            m.setenv("COMMHOOKS_NATIVE", "0")
            _, want_results, want_locals = _run(plain, grads)
        _assert_same(results, want_results)
        _assert_same(locals_, want_locals)
        _assert_same(
            [[ef.residual(k) for k in KEYS] for ef in fused],
            [[ef.residual(k) for k in KEYS] for ef in plain],
        )


@pytest.mark.parametrize("where", [0, 2])  # the torch formulas' tensor, the kernel's
def test_overflow_reaches_the_result_and_keeps_that_residual(where, monkeypatch):
    world = 2
    fused = [ErrorFeedback("fp16") for _ in range(world)]
    plain = [ErrorFeedback("fp16") for _ in range(world)]
    for efs in (fused, plain):
        _run(efs, _grads(world, 0))
    before = [[fused[r].residual(k).clone() for k in KEYS] for r in range(world)]
    grads = _grads(world, 1)
    grads[1][where].view(-1)[5] = 1e6  # / 2 ranks is past fp16's 65504
    exchanges, results, _ = _run(fused, grads)
    assert isinstance(exchanges[0], FusedCastExchange)
    with monkeypatch.context() as m:
        m.setenv("COMMHOOKS_NATIVE", "0")
        _, want, _ = _run(plain, grads)
    _assert_same(results, want)
    assert results[0][where].view(-1)[5] == float("inf")  # GradScaler hears of it
    for r in range(world):
        for i, k in enumerate(KEYS):
            torch.testing.assert_close(fused[r].residual(k), plain[r].residual(k), rtol=0, atol=0)
            # Only the overflowing rank's tensor keeps its old residual.
            assert torch.equal(fused[r].residual(k), before[r][i]) == (r == 1 and i == where)


def test_an_abandoned_exchange_leaves_residuals_alone():
    ef = ErrorFeedback("bf16")
    _run([ef], _grads(1, 0))
    before = [ef.residual(k).clone() for k in KEYS]
    ex = ef.exchange(KEYS, _grads(1, 1)[0], 2)
    assert isinstance(ex, FusedCastExchange)
    assert ex.message() is not None
    ex.abandon()
    for k, old in zip(KEYS, before):
        assert torch.equal(ef.residual(k), old)


def test_other_dtypes_and_momentum_go_op_by_op():
    ef = ErrorFeedback("fp16")
    g64 = [torch.randn(native.MIN_NUMEL, dtype=torch.float64)]
    for _ in range(2):
        ex = ef.exchange(["w"], g64, 2)
        simulate_allreduce([ex])
        ex.result()
    assert not isinstance(ex, FusedCastExchange)  # fp64 residuals: the torch path's precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_casts_round_as_torch(dtype):
    info = torch.finfo(dtype)
    # Subnormals, ties, the largest finite values and past them, both signs.
    mags = torch.cat(
        [
            torch.logspace(-30, 38, 200_001),
            torch.tensor([info.tiny / 3, info.max, info.max * 1.0001, 65519.0, 65520.0]),
        ]
    )
    x = torch.cat([mags, -mags]).contiguous()
    h = torch.empty(x.numel(), dtype=dtype)
    finite = native.cast_encode(x, None, 1.0, h)
    assert torch.equal(h.view(torch.int16), x.to(dtype).view(torch.int16))
    assert finite == bool(torch.isfinite(x.to(dtype)).all())
    assert torch.equal(native.cast_decode(h, 1.0), h.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_flags_nan(dtype):
    x = torch.randn(100_003)
    x[77_777] = float("nan")
    h = torch.empty(x.numel(), dtype=dtype)
    assert not native.cast_encode(x, torch.zeros_like(x), 0.5, h)
    assert torch.isnan(h[77_777].float())


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_fused_compress_matches_op_by_op(spec, monkeypatch):
    """Error feedback's compress (all-gather transports) through the kernels: the same payloads
    and residuals; an fp16 overflow goes op by op, keeping the residual."""
    fused, plain = ErrorFeedback(spec, decay=0.9), ErrorFeedback(spec, decay=0.9)
    for step in range(4):
        g = _grads(1, step)[0][2]
        if step == 3:
            g[9] = 1e6 if spec == "fp16" else 3.4e38  # past the largest bf16
        got, _ = fused.compress("w", g)
        with monkeypatch.context() as m:
            m.setenv("COMMHOOKS_NATIVE", "0")
            want, _ = plain.compress("w", g)
        assert torch.equal(got[0].view(torch.int16), want[0].view(torch.int16))
        torch.testing.assert_close(fused.residual("w"), plain.residual("w"), rtol=0, atol=0)
    assert not torch.isfinite(got[0].float()).all()


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_result_into_writes_the_mean_into_the_inputs(spec, monkeypatch):
    """The transport's path: the mean decoded straight into the gradients being averaged, the
    residuals (which read those gradients) written first; as the op-by-op result / world."""
    world = 3
    fused = [ErrorFeedback(spec) for _ in range(world)]
    plain = [ErrorFeedback(spec) for _ in range(world)]
    for step in range(3):
        grads = _grads(world, step)
        with monkeypatch.context() as m:
            m.setenv("COMMHOOKS_NATIVE", "0")
            _, want, _ = _run(plain, [[g.clone() for g in gs] for gs in grads])
        exchanges = [ef.exchange(KEYS, g, world) for ef, g in zip(fused, grads)]
        simulate_allreduce(exchanges)
        for ex, gs in zip(exchanges, grads):
            ex.result_into(gs, world)
        _assert_same(grads, [[w / world for w in ws] for ws in want])
        _assert_same(
            [[ef.residual(k) for k in KEYS] for ef in fused],
            [[ef.residual(k) for k in KEYS] for ef in plain],
        )


def test_bf16_near_the_fp32_maximum_keeps_the_residual(monkeypatch):
    """c a hair under fp32's maximum casts to a finite bf16 whose h / s (two ranks) is not:
    both paths keep the old residual rather than store a non-finite one."""
    world = 2
    fused = [ErrorFeedback("bf16") for _ in range(world)]
    plain = [ErrorFeedback("bf16") for _ in range(world)]
    for efs in (fused, plain):
        _run(efs, _grads(world, 0))
    grads = _grads(world, 1)
    grads[0][2][3] = 3.4e38
    before = fused[0].residual("large").clone()
    _run(fused, grads)
    with monkeypatch.context() as m:
        m.setenv("COMMHOOKS_NATIVE", "0")
        _run(plain, grads)
    assert torch.equal(fused[0].residual("large"), before)
    for ef_f, ef_p in zip(fused, plain):
        for k in KEYS:
            torch.testing.assert_close(ef_f.residual(k), ef_p.residual(k), rtol=0, atol=0)


def test_result_into_half_precision_outputs():
    """Outputs the kernel does not take (an fp16 bucket) get the torch formulas' values."""
    world = 2
    efs = [ErrorFeedback("fp16") for _ in range(world)]
    _run(efs, _grads(world, 0))
    grads = _grads(world, 1)
    exchanges = [ef.exchange(KEYS, g, world) for ef, g in zip(efs, grads)]
    simulate_allreduce(exchanges)
    want = [(r / world).half() for r in exchanges[0].result()]
    outs = [torch.empty(g.shape, dtype=torch.float16) for g in grads[0]]
    exchanges[0].result_into(outs, world)
    _assert_same([outs], [want])
