"""The shared-scale quantizer's fused error-feedback exchange against the op-by-op one.

tests/test_feedback_fused.py runs it through the common plan (abandoned and rolled-back
steps, non-finite input); these cover what that plan does not reach: the mean decoded into
the caller's buffer, every code width, the wire, a finite ``|c|`` past the safe bound, the
kernels' threads (a tensor past their 2**17-element floor) and a step decided on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from commhooks import ErrorFeedback
from commhooks.compressors._shared_scale import FusedSharedScaleExchange
from commhooks.feedback import SAFE_ABS
from commhooks.testing import simulate_allreduce

SPEC = "uniform:bits=8,shared_scale=true,chunk=1000"
#: a tensor the kernels split over threads (with a short last chunk) and one below their
#: size floor (torch formulas)
SHAPES = [(400, 401), (50, 20)]
KEYS = ["w", "b"]


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    """The kernels run on as many threads as torch does: two, so their ranges split."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _grads(step: int, rank: int, big: float | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    out = [torch.randn(s, generator=gen) for s in SHAPES]
    if big is not None:
        out[0][7, 3] = big
    return out


def _run(
    efs: list[ErrorFeedback],
    step: int,
    world: int,
    big: float | None = None,
    on_device: bool = False,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[type]]:
    """One exchange on every simulated rank: each rank's means (decoded with
    ``result_into``), the wire of each round, and the exchanges' types. ``on_device``: the
    step is decided as the engine's device mode does (no host checks; rolled back where
    some mean is not finite)."""
    grads = [_grads(step, r, big if r == 1 else None) for r in range(len(efs))]
    for ef in efs:
        ef.journal(True, on_device=on_device)
    exchanges = [ef.exchange(KEYS, g, world) for ef, g in zip(efs, grads)]
    wire = [m.tensors[0] for m in simulate_allreduce(exchanges)]
    means = [[torch.full(s, float("nan")) for s in SHAPES] for _ in efs]
    for ex, out in zip(exchanges, means):
        ex.result_into(out, float(world))
    for ef, out in zip(efs, means):
        if on_device:
            ef.rollback_where(~torch.stack([torch.isfinite(m).all() for m in out]).all())
        else:
            ef.commit_step()
    return means, wire, [type(ex) for ex in exchanges]


def _same_means_and_residuals(
    efs: dict[bool, list[ErrorFeedback]],
    fused: list[list[torch.Tensor]],
    ref: list[list[torch.Tensor]],
    step: int,
) -> None:
    """Each rank's means and stored residuals, fused against op by op, bit for bit (and the
    residuals finite)."""
    for r in range(len(fused)):
        for a, b in zip(fused[r], ref[r]):
            assert torch.equal(a, b), f"step {step}, rank {r}: the mean differs"
        for k in KEYS:
            a, b = efs[True][r].residual(k), efs[False][r].residual(k)
            assert a is not None and b is not None
            assert torch.equal(a, b), f"step {step}, rank {r}: residual {k} differs"
            assert torch.isfinite(a).all(), f"step {step}, rank {r}: residual {k}"


@pytest.mark.parametrize(
    ("world", "width"), [(2, torch.int8), (300, torch.int16), (40000, torch.int32)]
)
def test_result_into_and_residuals_equal_the_op_by_op_exchange(
    world: int, width: torch.dtype
) -> None:
    """Means, wire and residuals bit for bit, for each code width (2 of ``world`` ranks
    simulated); the first step has no residual yet and goes op by op on both sides."""
    efs = {f: [ErrorFeedback(SPEC, fused=f) for _ in range(2)] for f in (True, False)}
    for step in range(3):
        fused, wire, kinds = _run(efs[True], step, world)
        ref, ref_wire, _ = _run(efs[False], step, world)
        if step > 0:
            assert kinds == [FusedSharedScaleExchange] * 2
        assert wire[1].dtype == width
        for a, b in zip(wire, ref_wire):
            assert torch.equal(a, b), f"step {step}: the wire differs"
        _same_means_and_residuals(efs, fused, ref, step)


def test_a_finite_value_past_the_safe_bound_takes_the_checked_formulas() -> None:
    """``|c|`` of 2e38 is finite but past SAFE_ABS: the kernel does not write that residual
    unchecked; the torch formulas keep what the op-by-op path keeps."""
    assert SAFE_ABS < 2e38
    efs = {f: [ErrorFeedback(SPEC, fused=f) for _ in range(2)] for f in (True, False)}
    for step in range(3):
        big = 2e38 if step == 1 else None
        fused, _, kinds = _run(efs[True], step, 2, big)
        ref, _, _ = _run(efs[False], step, 2, big)
        if step > 0:
            assert kinds == [FusedSharedScaleExchange] * 2
        _same_means_and_residuals(efs, fused, ref, step)


def test_a_step_decided_on_the_device_keeps_what_the_reference_keeps() -> None:
    """Device mode: the kernel writes residuals unchecked and a step whose means are not
    finite (a NaN on one rank) is rolled back on the device; the memory ends as the op-by-op
    path's, step by step."""
    efs = {f: [ErrorFeedback(SPEC, fused=f) for _ in range(2)] for f in (True, False)}
    for step in range(4):
        bad = float("nan") if step == 2 else None
        fused, _, kinds = _run(efs[True], step, 2, bad, on_device=True)
        ref, _, _ = _run(efs[False], step, 2, bad, on_device=True)
        if step > 0:
            assert kinds == [FusedSharedScaleExchange] * 2
        if step == 2:
            assert not torch.isfinite(fused[0][0]).all()  # the NaN reached the means
            for r in range(2):
                for k in KEYS:
                    a, b = efs[True][r].residual(k), efs[False][r].residual(k)
                    assert a is not None and b is not None and torch.equal(a, b), (r, k)
        else:
            _same_means_and_residuals(efs, fused, ref, step)


def test_stochastic_rounding_and_fp64_go_op_by_op() -> None:
    """The kernels round to nearest, in fp32: other configs keep the op-by-op exchange."""
    cases = [
        ("uniform:bits=8,shared_scale=true,stochastic=true", torch.float32),
        (SPEC, torch.float64),
    ]
    for spec, dtype in cases:
        ef = ErrorFeedback(spec, fused=True)
        for _ in range(2):
            g = [torch.randn(200, 101, dtype=dtype)]
            ex = ef.exchange(["w"], g, 2)
            assert not isinstance(ex, FusedSharedScaleExchange), (spec, dtype)
            simulate_allreduce([ex])
            ex.result()
            ef.commit_step()
