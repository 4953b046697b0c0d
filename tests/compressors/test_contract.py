"""The contract every registered compressor keeps, checked for all of them at once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.compressors.base import Compressor, Context
from commhooks.testing import simulate_allreduce

# Each name at its defaults, plus the compositions and modes that change the wire format.
SPECS = [
    *commhooks.available(),
    "topk:ratio=0.05,index_coding=delta",
    "topk:ratio=0.05|uniform:bits=4",
    "randomk:ratio=0.1|fp16",
    "uniform:bits=4,entropy=true",
    "uniform:bits=6,shared_scale=true",
    "qsgd:levels=4,entropy=true",
    "nonuniform:levels=quantile",
    "sign:aggregation=majority",
    "ternary:mode=threshold",
    "powersgd:rank=2",
]
SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def build(spec: str) -> Compressor:
    return commhooks.compressor(spec)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_shape_and_dtype(spec: str, dtype: torch.dtype) -> None:
    c = build(spec)
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        payload, ctx = c.compress(x, "w")
        assert isinstance(payload, tuple)
        assert all(isinstance(t, torch.Tensor) for t in payload)
        assert Compressor.nbytes(payload) == sum(t.numel() * t.element_size() for t in payload)
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", SPECS)
def test_any_ranks_context_decodes_any_ranks_payload(spec: str) -> None:
    """All-gather decodes rank i's payload with rank j's context."""
    a, b = build(spec), build(spec)
    b.set_seed(1)
    x, z = torch.randn(64, 33), torch.randn(64, 33)
    pa, ca = a.compress(x, "w")
    _, cb = b.compress(z, "w")
    torch.testing.assert_close(b.decompress(pa, cb), a.decompress(pa, ca), rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_input_shows_in_the_output(spec: str, bad: float) -> None:
    c = build(spec)
    x = torch.randn(40, 50)
    x[17, 3] = bad
    y = c.decompress(*c.compress(x, "w"))
    assert not torch.isfinite(y).all(), f"{spec} hid a {bad} from GradScaler"


@pytest.mark.parametrize("spec", SPECS)
def test_non_float_dtype_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="dtype"):
        build(spec).compress(torch.arange(10), "w")


@pytest.mark.parametrize("spec", SPECS)
def test_spec_string_rebuilds_the_same_config(spec: str) -> None:
    c = build(spec)
    assert build(c.config.spec()).config == c.config


@pytest.mark.parametrize("spec", [s for s in SPECS if build(s).capabilities.summable])
def test_result_into_writes_the_mean_over_its_own_inputs(spec: str) -> None:
    """The transports' path into the caller's memory: the same values as result() / world,
    with the inputs themselves as the outputs (every input read before any is written)."""
    world = 3
    gen = torch.Generator().manual_seed(2)
    shapes = [(16, 12), (30,)]
    inputs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
    keys = ["a", "b"]

    def exchanges(data: list[list[torch.Tensor]]) -> list:
        exs = [build(spec).exchange(x, keys, world) for x in data]
        simulate_allreduce(exs)
        return exs

    want = [r / world for r in exchanges([[t.clone() for t in x] for x in inputs])[0].result()]
    exs = exchanges(inputs)
    exs[0].result_into(inputs[0], world)
    # PowerSGD divides the small Q rather than the decoded product: rounding apart, the same.
    tol = {"rtol": 1e-6, "atol": 1e-7} if spec.startswith("powersgd") else {"rtol": 0, "atol": 0}
    for got, expect in zip(inputs[0], want):
        torch.testing.assert_close(got, expect, **tol)


@pytest.mark.parametrize("spec", [s for s in SPECS if build(s).capabilities.summable])
@pytest.mark.parametrize("world", [1, 3])
def test_summable_exchange_decodes_to_the_sum_of_locals(spec: str, world: int) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(16, 12), (30,), (16, 12), (3, 4, 5)]
    ranks = [build(spec) for _ in range(world)]
    inputs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
    keys = [f"p{i}" for i in range(len(shapes))]
    exchanges = [c.exchange(x, keys, world) for c, x in zip(ranks, inputs)]
    first = exchanges[0].message()
    assert first is not None
    # A half-precision wire sums in half precision: allow its rounding, no more.
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in first.tensors)
    tol = 2e-2 if half else 1e-3
    rounds = simulate_allreduce(exchanges)
    assert len(rounds) == ranks[0].capabilities.rounds
    results = [ex.result() for ex in exchanges]
    for r in results[1:]:
        for a, b in zip(results[0], r):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for i, shape in enumerate(shapes):
        summed_local = sum(ex.local()[i] for ex in exchanges)
        assert results[0][i].shape == torch.Size(shape)
        torch.testing.assert_close(results[0][i], summed_local, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", [s for s in SPECS if not build(s).capabilities.summable])
def test_non_summable_refuses_an_exchange(spec: str) -> None:
    with pytest.raises(ValueError, match="not summable"):
        build(spec).exchange([torch.randn(4)], ["w"], 2)


# Majority vote is deliberately not a sum; test_sign.py checks its own rule.
SUM_AGGREGATED = [s for s in SPECS if "majority" not in s]


@pytest.mark.parametrize("spec", SUM_AGGREGATED)
def test_aggregate_is_the_sum_of_decoded_payloads(spec: str) -> None:
    c = build(spec)
    xs = [torch.randn(50, 20) for _ in range(3)]
    compressed = [c.compress(x, "w") for x in xs]
    ctx = compressed[-1][1]
    expected = sum(c.decompress(p, ctx) for p, _ in compressed)
    torch.testing.assert_close(c.aggregate([p for p, _ in compressed], ctx), expected)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(50, 20), (200, 100)], ids=["torch", "kernels"])
def test_aggregate_into_a_buffer_equals_new_memory(spec: str, shape: tuple[int, int]) -> None:
    """``aggregate(.., out=buf)`` (what the all-gather transport passes): the same sum, in the
    buffer for every plain sum (PowerSGD's product and the majority vote return new memory).
    The larger shape is past the native kernels' size floor."""
    c = build(spec)
    gen = torch.Generator().manual_seed(1)
    compressed = [c.compress(torch.randn(shape, generator=gen), "w") for _ in range(3)]
    payloads, ctx = [p for p, _ in compressed], compressed[-1][1]
    expected = c.aggregate(payloads, ctx)
    buf = torch.full(shape, float("nan"))
    got = c.aggregate(payloads, ctx, buf)
    assert torch.equal(got, expected), spec
    if spec in SUM_AGGREGATED and not spec.startswith("powersgd"):
        assert got.data_ptr() == buf.data_ptr(), f"{spec}: summed into new memory"


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip_reproduces_payloads(spec: str) -> None:
    a = build(spec)
    x = torch.randn(128, 16)
    for _ in range(3):
        a.compress(x, "w")
    b = build(spec)
    b.load_state_dict(a.state_dict())
    pa, _ = a.compress(x, "w")
    pb, _ = b.compress(x, "w")
    assert len(pa) == len(pb)
    for ta, tb in zip(pa, pb):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)


finite_arrays = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=0, max_size=300)


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=20, deadline=None)
@given(values=finite_arrays)
def test_hypothesis_inputs_round_trip(spec: str, values: list[float]) -> None:
    c = build(spec)
    x = torch.tensor(values, dtype=torch.float32)
    payload, ctx = c.compress(x, "w")
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


def test_empty_tensor_has_an_empty_payload() -> None:
    for spec in SPECS:
        payload, ctx = build(spec).compress(torch.empty(0, 5), "w")
        assert payload == () and isinstance(ctx, Context)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_round_trip_matches_cpu_shape_and_device(spec: str) -> None:
    c = build(spec)
    x = torch.randn(257, 33, device="cuda")
    payload, ctx = c.compress(x, "w")
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape
