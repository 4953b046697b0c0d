"""PowerSGD: exactness on low-rank matrices, the two-round exchange, warm starts and state."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.compressors.base import Compressor, Exchange, Message, compute_dtype
from commhooks.compressors.powersgd import (
    PowerSGD,
    PowerSGDConfig,
    as_matrix,
    orthogonalize,
)
from commhooks.feedback import fused_exchange
from commhooks.testing import simulate_allreduce

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
METHODS = ["gram_schmidt", "qr", "auto"]


def build(spec: str = "powersgd") -> PowerSGD:
    c = commhooks.compressor(spec)
    assert isinstance(c, PowerSGD)
    return c


def low_rank(n: int, m: int, r: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, r, generator=gen, dtype=dtype) @ torch.randn(
        r, m, generator=gen, dtype=dtype
    )


def fake_ranks(spec: str, world: int) -> list[PowerSGD]:
    ranks = [build(spec) for _ in range(world)]
    for r, c in enumerate(ranks):
        c.set_seed(100 + r)  # private seeds differ per rank; nothing shared may depend on them
    return ranks


def exchange_all(
    ranks: Sequence[PowerSGD], inputs: Sequence[Sequence[torch.Tensor]], keys: Sequence[str]
) -> tuple[list[Exchange], list[Message]]:
    exchanges = [c.exchange(x, keys, len(ranks)) for c, x in zip(ranks, inputs)]
    return exchanges, simulate_allreduce(exchanges)


# -- config, registry, bad input -------------------------------------------------------------------


def test_registered_and_built_from_spec() -> None:
    assert "powersgd" in commhooks.available()
    c = commhooks.compressor(
        "powersgd:rank=4,warm_start=false,orthogonalization=qr,min_compression_rate=1.5,seed=3"
    )
    assert c.config == PowerSGDConfig(
        rank=4, warm_start=False, orthogonalization="qr", min_compression_rate=1.5, seed=3
    )
    assert commhooks.compressor(c.config.spec()).config == c.config


def test_precision_and_iterations_from_spec() -> None:
    c = build("powersgd:rank=4,precision=bf16,iterations=2")
    assert (c.config.precision, c.config.iterations, c.wire_dtype) == ("bf16", 2, torch.bfloat16)
    assert c.capabilities.rounds == 4
    assert build("powersgd:precision=fp16").wire_dtype == torch.float16
    assert build().wire_dtype is None and build().config.iterations == 1


def test_capabilities() -> None:
    caps = build().capabilities
    assert (caps.kind.value, caps.summable, caps.static_size, caps.unbiased, caps.rounds) == (
        "lowrank", True, True, False, 2,
    )  # fmt: skip
    assert caps.stateful
    assert not build("powersgd:warm_start=false").capabilities.stateful


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 1.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"warm_start": "yes"}, "warm_start"),
        ({"orthogonalization": "svd"}, "orthogonalization"),
        ({"min_compression_rate": 0.5}, "min_compression_rate"),
        ({"min_compression_rate": float("nan")}, "min_compression_rate"),
        ({"min_compression_rate": "2"}, "min_compression_rate"),
        ({"seed": 1.0}, "seed"),
        ({"precision": "fp8"}, "precision"),
        ({"iterations": 0}, "iterations"),
        ({"iterations": 1.0}, "iterations"),
    ],
)
def test_bad_fields_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PowerSGDConfig(**kwargs)


@pytest.mark.parametrize(
    "spec,field",
    [
        ("powersgd:rank=0", "rank"),
        ("powersgd:rank=two", "rank"),
        ("powersgd:warm_start=maybe", "warm_start"),
        ("powersgd:orthogonalization=lu", "orthogonalization"),
        ("powersgd:min_compression_rate=0.9", "min_compression_rate"),
    ],
)
def test_bad_specs_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        commhooks.compressor(spec)


def test_matrix_view() -> None:
    assert as_matrix(torch.Size([8, 4, 3, 3])) == (8, 36)
    assert as_matrix(torch.Size([30])) == (30, 1)
    assert as_matrix(torch.Size([])) == (1, 1)
    assert as_matrix(torch.Size([0, 5])) == (0, 0)


def test_compression_threshold() -> None:
    # 4 x 4 at rank 1: 16 elements against (4 + 4) * 1 = 8 sent values, a rate of exactly 2.
    assert build("powersgd:min_compression_rate=2").compresses(4, 4)
    assert not build("powersgd:min_compression_rate=2.01").compresses(4, 4)
    assert not build("powersgd:min_compression_rate=1").compresses(1000, 1)  # 1-D stays dense
    x = torch.randn(4, 4)
    assert len(build("powersgd:min_compression_rate=2").compress(x, "w")[0]) == 2
    assert len(build("powersgd:min_compression_rate=2.01").compress(x, "w")[0]) == 1


# -- single tensor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_shapes_and_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    c = build("powersgd:rank=2")
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        payload, ctx = c.compress(x, "w")
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        n, m = as_matrix(x.shape)
        if not c.compresses(n, m):
            assert torch.equal(y, x)  # dense: exact
            continue
        # P P^T M is an orthogonal projection: the residual is orthogonal to the output.
        xf, yf = x.double(), (payload[0].double() @ payload[1].double().T).view(x.shape)
        assert abs(float(((xf - yf) * yf).sum())) <= 1e-5 * float(xf.square().sum())
        assert float(yf.norm()) <= float(xf.norm()) * (1 + 1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(20, 30), (64, 16), (7, 50), (12, 5, 2, 2)])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_exact_on_matrices_of_rank_at_most_r(method: str, shape: tuple[int, ...], r: int) -> None:
    gen = torch.Generator().manual_seed(r)
    n, m = as_matrix(shape)
    for true_rank in sorted({1, r}):  # rank r, and rank-deficient (rank 1 < r)
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
            c = build(f"powersgd:rank={r},orthogonalization={method},min_compression_rate=1")
            assert c.compresses(n, m)
            x = low_rank(n, m, true_rank, gen).to(dtype).view(shape)
            y = c.decompress(*c.compress(x, "w"))
            err = float((y - x).double().norm() / x.double().norm())
            assert err <= tol, (true_rank, dtype, err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 3])
def test_payload_bytes(dtype: torch.dtype, r: int) -> None:
    c = build(f"powersgd:rank={r}")
    wide = 8 if dtype == torch.float64 else 4
    for shape, n, m in (((40, 50), 40, 50), ((16, 3, 3, 3), 16, 27)):
        payload, _ = c.compress(torch.randn(shape).to(dtype), "w")
        assert [t.shape for t in payload] == [(n, r), (m, r)]
        assert Compressor.nbytes(payload) == (n + m) * r * wide
    for shape in ((1023,), (3, 2)):
        x = torch.randn(shape).to(dtype)
        payload, _ = c.compress(x, "w")
        assert Compressor.nbytes(payload) == x.numel() * x.element_size()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_computes_in_fp32(dtype: torch.dtype) -> None:
    x = torch.randn(60, 40).to(dtype)
    c, ref = build("powersgd:rank=2"), build("powersgd:rank=2")
    payload, ctx = c.compress(x, "w")
    assert all(t.dtype == torch.float32 for t in payload)
    y = c.decompress(payload, ctx)
    assert y.dtype == dtype
    expected = ref.decompress(*ref.compress(x.float(), "w")).to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert c.memory["w"].dtype == torch.float32
    c.compress(x.double(), "w")
    assert c.memory["w"].dtype == torch.float64


def test_any_context_decodes_any_payload_and_aggregate_is_the_sum() -> None:
    a, b = build("powersgd:rank=2"), build("powersgd:rank=2")
    xs = [torch.randn(30, 20) for _ in range(3)]
    pa, ca = a.compress(xs[0], "w")
    _, cb = b.compress(xs[1], "u")
    torch.testing.assert_close(b.decompress(pa, cb), a.decompress(pa, ca), rtol=0, atol=0)
    compressed = [a.compress(x, "w") for x in xs]
    expected = sum(a.decompress(p, ctx) for p, ctx in compressed)
    torch.testing.assert_close(a.aggregate([p for p, _ in compressed], ca), expected)


def test_corrupt_payload_is_refused() -> None:
    c = build()
    payload, ctx = c.compress(torch.randn(30, 20), "w")
    with pytest.raises(ValueError, match="payload"):
        c.decompress((payload[0][:5], payload[1]), ctx)


# -- shared randomness, warm start, state ----------------------------------------------------------


def test_initial_q_is_shared_whatever_the_call_order() -> None:
    xs = {"a": torch.randn(30, 20), "b": torch.randn(30, 20), "c": torch.randn(20, 30)}
    one, two = build("powersgd:rank=2"), build("powersgd:rank=2")
    two.set_seed(7)
    first = {k: one.compress(x, k)[0] for k, x in xs.items()}
    second = {k: two.compress(xs[k], k)[0] for k in reversed(list(xs))}
    for k in xs:
        for s, t in zip(first[k], second[k]):
            torch.testing.assert_close(s, t, rtol=0, atol=0)
    # Another seed draws another Q.
    other = build("powersgd:rank=2,seed=1").compress(xs["a"], "a")[0]
    assert not torch.equal(other[1], first["a"][1])


def test_memory_is_per_key_fp32_with_unit_columns() -> None:
    c = build("powersgd:rank=3")
    c.compress(torch.randn(40, 25, dtype=torch.float16), "w")
    c.compress(torch.randn(40, 25), None)
    c.compress(torch.randn(100), "bias")  # dense: no Q
    assert set(c.memory) == {"w"}
    q = c.memory["w"]
    assert q.shape == (25, 3) and q.dtype == torch.float32
    torch.testing.assert_close(q.norm(dim=0), torch.ones(3))
    # A key whose shape changes starts over instead of failing.
    c.compress(torch.randn(40, 26), "w")
    assert c.memory["w"].shape == (26, 3)
    cold = build("powersgd:warm_start=false")
    cold.compress(torch.randn(40, 25), "w")
    assert dict(cold.memory) == {}


def test_without_warm_start_each_step_draws_a_new_q() -> None:
    x = torch.randn(40, 30)
    c = build("powersgd:rank=2,warm_start=false")
    p1, p2 = c.compress(x, "w")[0], c.compress(x, "w")[0]
    assert not torch.allclose(p1[0].abs(), p2[0].abs())
    # key=None: no memory and no counter, so every call (on every rank) uses the same Q.
    n1, n2 = c.compress(x, None)[0], c.compress(x, None)[0]
    torch.testing.assert_close(n1[0], n2[0], rtol=0, atol=0)


def test_state_dict_round_trip_single_tensor() -> None:
    x = torch.randn(64, 48)
    a = build("powersgd:rank=2")
    for _ in range(3):
        a.compress(x + torch.randn(64, 48) * 0.1, "w")
    state = a.state_dict()
    assert set(state) >= {"seed", "draws", "steps", "q"} and set(state["q"]) == {"w"}
    b = build("powersgd:rank=2")
    b.load_state_dict(state)
    for _ in range(2):
        pa, pb = a.compress(x, "w")[0], b.compress(x, "w")[0]
        for s, t in zip(pa, pb):
            torch.testing.assert_close(s, t, rtol=0, atol=0)
    # A fresh compressor (no state) gives a different, cold-start payload.
    cold = build("powersgd:rank=2").compress(x, "w")[0]
    assert not torch.equal(cold[0], pa[0])


def test_state_dict_round_trip_exchange() -> None:
    world, keys = 2, ["w1", "w2", "b"]
    gen = torch.Generator().manual_seed(3)
    steps = [
        [[torch.randn(24, 18, generator=gen), torch.randn(24, 18, generator=gen),
          torch.randn(18, generator=gen)] for _ in range(world)]
        for _ in range(4)
    ]  # fmt: skip
    ranks = fake_ranks("powersgd:rank=2", world)
    for inputs in steps[:2]:
        exchange_all(ranks, inputs, keys)
    restored = fake_ranks("powersgd:rank=2", world)
    for new, old in zip(restored, ranks):
        new.load_state_dict(old.state_dict())
    for inputs in steps[2:]:
        ea, _ = exchange_all(ranks, inputs, keys)
        eb, _ = exchange_all(restored, inputs, keys)
        for s, t in zip(ea[0].result(), eb[0].result()):
            torch.testing.assert_close(s, t, rtol=0, atol=0)


# -- the two-round exchange ------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_exchange_agrees_across_ranks_and_sums_the_locals(world: int, method: str) -> None:
    gen = torch.Generator().manual_seed(world)
    shapes = [(16, 12), (16, 12), (30,), (3, 4, 5), (20, 9)]
    keys = [f"p{i}" for i in range(len(shapes))]
    ranks = fake_ranks(f"powersgd:rank=2,orthogonalization={method}", world)
    for _ in range(2):  # a cold and a warm step
        inputs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
        exchanges, sent = exchange_all(ranks, inputs, keys)
        assert len(sent) == 2
        results = [ex.result() for ex in exchanges]
        for other in results[1:]:  # (a) every rank gets the same result, bit for bit
            for s, t in zip(results[0], other):
                torch.testing.assert_close(s, t, rtol=0, atol=0)
        for i, shape in enumerate(shapes):  # (b) the result is the sum of the locals
            summed = sum(ex.local()[i] for ex in exchanges)
            assert results[0][i].shape == torch.Size(shape)
            torch.testing.assert_close(results[0][i], summed, rtol=1e-5, atol=1e-5)
        # Every rank remembers the same Q, or the next step's P sum would mix subspaces.
        for c in ranks[1:]:
            for k in ranks[0].memory:
                torch.testing.assert_close(c.memory[k], ranks[0].memory[k], rtol=0, atol=0)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_exchange_is_exact_when_ranks_jointly_span_rank_r(world: int, method: str) -> None:
    """Matrices U A_i V^T share an r-dimensional column space: their sum is recovered."""
    r = 3
    gen = torch.Generator().manual_seed(world)
    shapes = [(40, 30), (40, 30), (20, 2, 3, 5)]
    bases = [(torch.randn(as_matrix(s)[0], r, generator=gen),
              torch.randn(as_matrix(s)[1], r, generator=gen)) for s in shapes]  # fmt: skip
    inputs = [
        [(u @ torch.randn(r, r, generator=gen) @ v.T).view(s) for s, (u, v) in zip(shapes, bases)]
        for _ in range(world)
    ]
    ranks = fake_ranks(f"powersgd:rank={r},orthogonalization={method}", world)
    exchanges, _ = exchange_all(ranks, inputs, ["a", "b", "c"])
    for i in range(len(shapes)):
        expected = sum(x[i] for x in inputs)
        err = float((exchanges[0].result()[i] - expected).norm() / expected.norm())
        assert err < 1e-4
    # Identical rank-1 matrices on every rank, a special case.
    x = low_rank(50, 40, 1, gen, torch.float32)
    exchanges, _ = exchange_all(fake_ranks(f"powersgd:rank={r}", world), [[x]] * world, ["w"])
    torch.testing.assert_close(exchanges[0].result()[0], x * world, rtol=1e-4, atol=1e-4)


def test_mixed_group_packs_each_round_into_one_buffer() -> None:
    """(d) same-shape matrices, a bias, a matrix too small to compress, a conv weight, an empty
    tensor and half-precision dtypes: two messages of one fp32 buffer each."""
    r, world = 2, 3
    gen = torch.Generator().manual_seed(5)
    specs = [
        ((16, 12), torch.float32), ((16, 12), torch.float32), ((16, 12), torch.bfloat16),
        ((12,), torch.bfloat16), ((3, 2), torch.float32), ((8, 4, 3, 3), torch.float16),
        ((0,), torch.float32), ((16, 12), torch.float16),
    ]  # fmt: skip
    ranks = fake_ranks(f"powersgd:rank={r}", world)
    inputs = [[torch.randn(s, generator=gen).to(d) for s, d in specs] for _ in range(world)]
    keys = [f"k{i}" for i in range(len(specs))]
    exchanges, sent = exchange_all(ranks, inputs, keys)
    assert len(sent) == 2
    compressed = [as_matrix(s) for s, _ in specs if ranks[0].compresses(*as_matrix(s))]
    assert sorted(compressed) == [(8, 36)] + [(16, 12)] * 4
    dense = sum(math.prod(s) for s, _ in specs if not ranks[0].compresses(*as_matrix(s)))
    assert dense == 12 + 6
    (p_buf,), (q_buf,) = sent[0].tensors, sent[1].tensors
    assert p_buf.dtype == q_buf.dtype == torch.float32
    assert p_buf.numel() == sum(n * r for n, _ in compressed) + dense
    assert q_buf.numel() == sum(m * r for _, m in compressed)
    # Sums come back in the compute dtype (no fp16 overflow); this rank's part in its own.
    summed, own = exchanges[0].result(), exchanges[0].local()
    assert [(t.shape, t.dtype) for t in summed] == [
        (torch.Size(s), compute_dtype(d)) for s, d in specs
    ]
    assert [(t.shape, t.dtype) for t in own] == [(torch.Size(s), d) for s, d in specs]
    result = exchanges[0].result()
    for i in (3, 4):  # dense tensors arrive summed exactly, in fp32
        expected = torch.stack([x[i].float() for x in inputs]).sum(0)
        torch.testing.assert_close(result[i], expected, rtol=0, atol=0)
        torch.testing.assert_close(exchanges[1].local()[i], inputs[1][i], rtol=0, atol=0)
    # The library's own simulator agrees on the round count.
    again = [c.exchange(x, keys, world) for c, x in zip(ranks, inputs)]
    assert len(simulate_allreduce(again)) == 2


def test_fp64_tensors_get_their_own_buffer() -> None:
    ranks = fake_ranks("powersgd", 2)
    inputs = [[torch.randn(20, 10), torch.randn(20, 10, dtype=torch.float64),
               torch.randn(5, dtype=torch.float64)] for _ in range(2)]  # fmt: skip
    exchanges, sent = exchange_all(ranks, inputs, ["a", "b", "c"])
    assert [t.dtype for t in sent[0].tensors] == [torch.float32, torch.float64]
    assert [t.numel() for t in sent[0].tensors] == [20, 20 + 5]
    assert [t.dtype for t in sent[1].tensors] == [torch.float32, torch.float64]
    out = exchanges[0].result()
    assert [t.dtype for t in out] == [torch.float32, torch.float64, torch.float64]
    torch.testing.assert_close(out[2], inputs[0][2] + inputs[1][2], rtol=0, atol=1e-15)
    # Only dense fp64 tensors: the fp64 buffer is not part of round 2.
    inputs = [[torch.randn(20, 10), torch.randn(5, dtype=torch.float64)] for _ in range(2)]
    _, sent = exchange_all(fake_ranks("powersgd", 2), inputs, ["a", "c"])
    assert [t.dtype for t in sent[0].tensors] == [torch.float32, torch.float64]
    assert [t.dtype for t in sent[1].tensors] == [torch.float32]


def test_groups_with_nothing_to_compress_skip_round_two() -> None:
    ranks = fake_ranks("powersgd", 2)
    inputs = [[torch.randn(7), torch.randn(2, 3)] for _ in range(2)]
    exchanges, sent = exchange_all(ranks, inputs, ["b", "t"])
    assert len(sent) == 1
    torch.testing.assert_close(exchanges[0].result()[0], inputs[0][0] + inputs[1][0])
    exchanges, sent = exchange_all(ranks, [[torch.empty(0)], [torch.empty(0)]], ["e"])
    assert sent == [] and exchanges[0].result()[0].shape == (0,)
    exchanges, sent = exchange_all(ranks, [[], []], [])
    assert sent == [] and exchanges[0].result() == []


def test_protocol_misuse_is_reported() -> None:
    ex = build().exchange([torch.randn(20, 10)], ["w"], 2)
    with pytest.raises(RuntimeError, match="result"):
        ex.result()
    with pytest.raises(RuntimeError, match="local"):
        ex.local()
    with pytest.raises(ValueError, match="reduced"):
        ex.receive([torch.zeros(3)])
    with pytest.raises(ValueError, match="keys"):
        build().exchange([torch.randn(20, 10)], ["a", "b"], 2)
    with pytest.raises(ValueError, match="world_size"):
        build().exchange([torch.randn(20, 10)], ["a"], 0)


@pytest.mark.parametrize("world", [1, 2])
def test_warm_start_reduces_the_error_over_steps(world: int) -> None:
    """(e) A fixed low-rank-plus-noise matrix: warm-started steps continue a power iteration,
    converging to the best rank-1 approximation; cold starts stay where they began."""
    gen = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(60, 3, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(40, 3, generator=gen))
    noise = 0.05 * torch.randn(60, 40, generator=gen)
    x = u @ torch.diag(torch.tensor([4.0, 3.0, 1.0])) @ v.T + noise
    best = float(torch.linalg.svdvals(x)[1:].square().sum().sqrt()) * world

    def errors(spec: str) -> list[float]:
        ranks = fake_ranks(spec, world)
        errs = []
        for _ in range(12):
            exchanges, _ = exchange_all(ranks, [[x]] * world, ["w"])
            errs.append(float((exchanges[0].result()[0] - world * x).norm()))
        return errs

    warm = errors("powersgd:rank=1")
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(warm))  # never worse
    excess = [e - best for e in warm]
    assert excess[-1] < 0.01 * excess[0]
    assert warm[-1] <= best * (1 + 1e-5)
    cold = errors("powersgd:rank=1,warm_start=false")
    assert min(cold) - best > 0.1 * excess[0]  # a fresh Q each step never converges


# -- zeros and non-finite values -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_input_shows_and_does_not_poison_the_memory(method: str, bad: float) -> None:
    c = build(f"powersgd:rank=2,orthogonalization={method}")
    x = torch.randn(40, 50)
    c.compress(x, "w")
    before = c.memory["w"].clone()
    poisoned = x.clone()
    poisoned[17, 3] = bad
    assert not torch.isfinite(c.decompress(*c.compress(poisoned, "w"))).all()
    torch.testing.assert_close(c.memory["w"], before, rtol=0, atol=0)  # the step is skipped
    assert torch.isfinite(c.decompress(*c.compress(x, "w"))).all()
    # The same through a two-rank exchange, with the bad value on one rank only.
    ranks = fake_ranks(f"powersgd:rank=2,orthogonalization={method}", 2)
    exchanges, _ = exchange_all(
        ranks, [[poisoned, torch.randn(9)], [x, torch.randn(9)]], ["w", "b"]
    )
    assert not torch.isfinite(exchanges[0].result()[0]).all()
    assert not torch.isfinite(exchanges[1].result()[0]).all()
    assert torch.isfinite(exchanges[0].result()[1]).all()  # other tensors unaffected
    exchanges, _ = exchange_all(ranks, [[x, torch.randn(9)]] * 2, ["w", "b"])
    assert torch.isfinite(exchanges[0].result()[0]).all()


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradients_give_zeros_and_keep_the_warm_start(method: str) -> None:
    c = build(f"powersgd:rank=2,orthogonalization={method}")
    gen = torch.Generator().manual_seed(2)
    zeros = torch.zeros(30, 20)
    y = c.decompress(*c.compress(zeros, "w"))
    assert torch.equal(y, zeros)
    # Had the zero Q been stored, P = M Q would be zero forever after.
    x = low_rank(30, 20, 2, gen, torch.float32)
    y = c.decompress(*c.compress(x, "w"))
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    ranks = fake_ranks(f"powersgd:rank=2,orthogonalization={method}", 2)
    exchanges, _ = exchange_all(ranks, [[zeros]] * 2, ["w"])
    assert torch.equal(exchanges[0].result()[0], zeros)
    exchanges, _ = exchange_all(ranks, [[x]] * 2, ["w"])
    torch.testing.assert_close(exchanges[0].result()[0], 2 * x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["gram_schmidt", "qr"])
def test_orthogonalize(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, 30, 4, generator=gen, dtype=torch.float64)
    p[1, :, 2] = p[1, :, 0] * 3  # rank-deficient: still orthonormal columns
    q = orthogonalize(p, method)
    eye = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    torch.testing.assert_close(q.mT @ q, eye, rtol=0, atol=1e-10)
    # Same span as P, column by column (up to sign) for full-rank matrices.
    proj = q @ q.mT @ p
    torch.testing.assert_close(proj, p, rtol=0, atol=1e-10)
    zero = orthogonalize(torch.zeros(2, 10, 2), method)
    assert torch.isfinite(zero).all()


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)
special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    r=st.integers(1, 3),
    method=st.sampled_from(METHODS),
    data=st.data(),
)
def test_hypothesis_inputs(n: int, m: int, r: int, method: str, data: st.DataObject) -> None:
    values = data.draw(st.lists(finite, min_size=n * m, max_size=n * m))
    x = torch.tensor(values, dtype=torch.float32).view(n, m)
    if data.draw(st.booleans()):
        x.view(-1)[data.draw(st.integers(0, n * m - 1))] = data.draw(special)
    c = build(f"powersgd:rank={r},orthogonalization={method},min_compression_rate=1")
    y = c.decompress(*c.compress(x, "k"))
    assert y.shape == x.shape and y.dtype == x.dtype
    if torch.isfinite(x).all():
        assert torch.isfinite(y).all()
        assert float(y.double().norm()) <= float(x.double().norm()) * (1 + 1e-4) + 1e-6
    else:
        assert not torch.isfinite(y).all()


shape_lists = st.lists(
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=6
)


@settings(max_examples=30, deadline=None)
@given(shapes=shape_lists, world=st.integers(1, 4), r=st.integers(1, 2), seed=st.integers(0, 99))
def test_hypothesis_exchange_sums_the_locals(
    shapes: list[tuple[int, ...]], world: int, r: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    ranks = fake_ranks(f"powersgd:rank={r},min_compression_rate=1", world)
    inputs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
    keys = [f"k{i}" for i in range(len(shapes))]
    exchanges, sent = exchange_all(ranks, inputs, keys)
    any_compressed = any(ranks[0].compresses(*as_matrix(s)) for s in shapes)
    any_data = any(math.prod(s) for s in shapes)
    assert len(sent) == (2 if any_compressed else 1 if any_data else 0)
    result = exchanges[0].result()
    for i, shape in enumerate(shapes):
        assert result[i].shape == torch.Size(shape)
        summed = sum(ex.local()[i] for ex in exchanges)
        torch.testing.assert_close(result[i], summed, rtol=1e-4, atol=1e-4)


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_round_trip_and_exchange(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    c = build(f"powersgd:rank=2,orthogonalization={method}")
    x = low_rank(257, 33, 2, gen, torch.float32).cuda()
    payload, ctx = c.compress(x, "w")
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    ranks = fake_ranks(f"powersgd:rank=2,orthogonalization={method}", 2)
    inputs = [[x.half(), torch.randn(33, device="cuda")] for _ in range(2)]
    exchanges, sent = exchange_all(ranks, inputs, ["w", "b"])
    assert len(sent) == 2 and all(t.is_cuda for m in sent for t in m.tensors)
    out = exchanges[0].result()
    assert out[0].dtype == torch.float16 and out[0].is_cuda
    torch.testing.assert_close(out[0].float(), 2 * x.half().float(), rtol=1e-2, atol=1e-2)


# -- the fused error-feedback exchange -------------------------------------------------------------

FUSED_SHAPES = [(24, 16), (24, 16), (30,), (6, 4, 3, 3), (40, 9), (2, 2)]
FUSED_KEYS = [f"p{i}" for i in range(len(FUSED_SHAPES))]


def _ef_step(efs, grads, outs=None):
    exchanges = [ef.exchange(FUSED_KEYS, g, len(efs)) for ef, g in zip(efs, grads)]
    simulate_allreduce(exchanges)
    if outs is None:
        return exchanges, [ex.result() for ex in exchanges]
    for ex, o in zip(exchanges, outs):
        ex.result_into(o, len(efs))
    return exchanges, outs


def _ef_grads(world: int, step: int, dtype=torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(10 * step + world)
    return [
        [torch.randn(s, generator=gen, dtype=dtype) for s in FUSED_SHAPES] for _ in range(world)
    ]


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_feedback_exchange_matches_op_by_op(world, decay, dtype, monkeypatch) -> None:
    from commhooks.compressors.powersgd import FusedPowerSGDExchange
    from commhooks.feedback import ErrorFeedback

    spec = "powersgd:rank=2"
    fused = [ErrorFeedback(spec, decay=decay) for _ in range(world)]
    plain = [ErrorFeedback(spec, decay=decay) for _ in range(world)]
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    for step in range(4):
        grads = _ef_grads(world, step, dtype)
        exchanges, results = _ef_step(fused, grads)
        # A key's first step has no residual to update in place: op by op, as compress() does.
        assert isinstance(exchanges[0], FusedPowerSGDExchange) == (step > 0)
        locals_ = [ex.local() for ex in exchanges]
        with monkeypatch.context() as m:
            m.setattr(PowerSGD, "_exchange_feedback", lambda *a, **k: None)
            want_ex, want = _ef_step(plain, grads)
        for r in range(world):
            for i, k in enumerate(FUSED_KEYS):
                torch.testing.assert_close(results[r][i], want[r][i], **tol)
                torch.testing.assert_close(locals_[r][i], want_ex[r].local()[i], **tol)
                torch.testing.assert_close(fused[r].residual(k), plain[r].residual(k), **tol)
                assert results[r][i].dtype == dtype and results[r][i].shape == grads[r][i].shape
            for k, q in plain[r].compressor.memory.items():
                torch.testing.assert_close(fused[r].compressor.memory[k], q, **tol)


def test_fused_result_into_writes_the_mean_over_the_gradients() -> None:
    from commhooks.compressors.powersgd import FusedPowerSGDExchange
    from commhooks.feedback import ErrorFeedback

    world = 2
    a = [ErrorFeedback("powersgd:rank=2") for _ in range(world)]
    b = [ErrorFeedback("powersgd:rank=2") for _ in range(world)]
    for step in range(3):
        grads = _ef_grads(world, step)
        _, want = _ef_step(a, [[g.clone() for g in gs] for gs in grads])
        # The outputs are the gradients themselves, as in the DDP hook: the residuals must
        # read them before the mean overwrites them.
        exchanges, outs = _ef_step(b, grads, outs=grads)
        assert isinstance(exchanges[0], FusedPowerSGDExchange) == (step > 0)
        for r in range(world):
            for i, k in enumerate(FUSED_KEYS):
                torch.testing.assert_close(outs[r][i], want[r][i] / world, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(b[r].residual(k), a[r].residual(k), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
def test_fused_non_finite_reaches_the_result_and_keeps_that_residual(bad) -> None:
    from commhooks.compressors.powersgd import FusedPowerSGDExchange
    from commhooks.feedback import ErrorFeedback

    efs = [ErrorFeedback("powersgd") for _ in range(2)]
    _ef_step(efs, _ef_grads(2, 0))
    before = [[ef.residual(k).clone() for k in FUSED_KEYS] for ef in efs]
    grads = _ef_grads(2, 1)
    grads[1][0][3, 5] = bad  # a compressed matrix on one rank
    exchanges, results = _ef_step(efs, grads)
    assert isinstance(exchanges[0], FusedPowerSGDExchange)
    assert not torch.isfinite(results[0][0]).all() and not torch.isfinite(results[1][0]).all()
    for ef, old in zip(efs, before):  # the NaN spread to every rank's P of that matrix
        assert torch.equal(ef.residual(FUSED_KEYS[0]), old[0])
        assert torch.isfinite(ef.residual(FUSED_KEYS[1])).all()
    assert torch.isfinite(_ef_step(efs, _ef_grads(2, 2))[1][0][0]).all()


def test_fused_abandon_keeps_residuals_and_overflow_resets_one() -> None:
    from commhooks.compressors.powersgd import FusedPowerSGDExchange
    from commhooks.feedback import ErrorFeedback

    ef = ErrorFeedback("powersgd")
    _ef_step([ef], _ef_grads(1, 0))
    before = [ef.residual(k).clone() for k in FUSED_KEYS]
    ex = ef.exchange(FUSED_KEYS, _ef_grads(1, 1)[0], 2)
    assert isinstance(ex, FusedPowerSGDExchange)
    assert ex.message() is not None
    ex.abandon()
    for k, e in zip(FUSED_KEYS, before):
        assert torch.equal(ef.residual(k), e)
    # Finite values whose sum g + e overflows: with a warm-start Q blind to that column, P and
    # Q stay finite while the new residual cannot; it is reset rather than left non-finite
    # (which would poison every later step).
    k = FUSED_KEYS[4]
    grads = _ef_grads(1, 2)[0]
    grads[4][0, 0] = 2e38
    ef.residual(k)[0, 0] = 2e38
    q = ef.compressor.memory[k]
    q[0] = 0.0
    q /= torch.linalg.vector_norm(q, dim=0)
    exchanges, _ = _ef_step([ef], [grads])
    assert isinstance(exchanges[0], FusedPowerSGDExchange)
    assert torch.equal(ef.residual(k), torch.zeros(FUSED_SHAPES[4]))
    assert torch.isfinite(ef.residual(FUSED_KEYS[0])).all()


def test_fused_needs_contiguous_matching_fp32_or_fp64() -> None:
    from commhooks.compressors.powersgd import FusedPowerSGDExchange

    c = build()
    g, e = torch.randn(20, 10), torch.randn(20, 10)
    assert isinstance(fused_exchange(c, [g], [e], ["w"], 2), FusedPowerSGDExchange)
    assert fused_exchange(c, [g.half()], [e], ["w"], 2) is None
    assert fused_exchange(c, [g.t()], [e.t()], ["w"], 2) is None
    assert fused_exchange(c, [g.double()], [e], ["w"], 2) is None


@pytest.mark.parametrize("offset", [0, 1, 3, 4])
@pytest.mark.parametrize("rank", [1, 2])
def test_fused_result_does_not_depend_on_where_the_gradient_lies(offset: int, rank: int) -> None:
    """DDP places gradients at any offset of its buckets, and rebuilds them: the numbers must
    not follow (a checkpoint resumed into fresh buckets stays bit-exact). As in the hook, the
    mean is written back over the gradient."""
    from commhooks.feedback import ErrorFeedback

    gen = torch.Generator().manual_seed(offset)
    g = torch.randn(33, 77, generator=gen)
    bucket = torch.zeros(g.numel() + 8)
    placed = bucket[offset : offset + g.numel()].view(33, 77)
    outs = []
    for grad in (torch.empty_like(g), placed):
        ef = ErrorFeedback(f"powersgd:rank={rank}")
        for step in range(3):
            grad.copy_(g * (step + 1))
            ex = ef.exchange(["w"], [grad], 1)
            simulate_allreduce([ex])
            ex.result_into([grad], 1)
        outs.append((grad.clone(), ef.residual("w")))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_fused_non_finite_keeps_only_the_affected_residuals(monkeypatch) -> None:
    """A NaN in one matrix of a same-shape batch and in one small tensor, on one rank: the
    other tensors' residuals update on every rank, as op by op."""
    from commhooks.compressors.powersgd import FusedPowerSGDExchange
    from commhooks.feedback import ErrorFeedback

    fused = [ErrorFeedback("powersgd:rank=2") for _ in range(2)]
    plain = [ErrorFeedback("powersgd:rank=2") for _ in range(2)]
    for efs in (fused, plain):
        _ef_step(efs, _ef_grads(2, 0))
    before = [[ef.residual(k).clone() for k in FUSED_KEYS] for ef in fused]
    grads = _ef_grads(2, 1)
    grads[1][0][2, 2] = float("nan")  # one of the two (24, 16) matrices
    grads[1][2][4] = float("nan")  # the 1-D tensor, sent dense
    exchanges, _ = _ef_step(fused, grads)
    assert isinstance(exchanges[0], FusedPowerSGDExchange)
    with monkeypatch.context() as m:
        m.setattr(PowerSGD, "_exchange_feedback", lambda *a, **k: None)
        _ef_step(plain, grads)
    for r in range(2):
        for i, k in enumerate(FUSED_KEYS):
            torch.testing.assert_close(fused[r].residual(k), plain[r].residual(k))
            if i in (0, 1, 3, 4):  # the compressed ones (dense residuals stay zero)
                assert torch.equal(fused[r].residual(k), before[r][i]) == (i == 0), (r, k)


# -- precision and power iterations ----------------------------------------------------------------


@pytest.mark.parametrize("precision,wire", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_half_precision_wire_and_iterations(
    precision: str, wire: torch.dtype, iterations: int
) -> None:
    """P and Q travel in the wire dtype, 2 * iterations rounds; the dense tensors of round 1
    keep fp32 and arrive summed exactly; every rank agrees bit for bit; this rank's local()
    is what it sent (its rounded Q), so the sum of the locals is the result up to the
    rounding of the sum itself."""
    world, r = 2, 2
    gen = torch.Generator().manual_seed(iterations)
    shapes = [(24, 16), (24, 16), (20,), (3, 2)]
    keys = [f"k{i}" for i in range(len(shapes))]
    ranks = fake_ranks(f"powersgd:rank={r},precision={precision},iterations={iterations}", world)
    inputs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
    exchanges, sent = exchange_all(ranks, inputs, keys)
    assert len(sent) == 2 * iterations
    p_sizes, q_sizes = 2 * 24 * r, 2 * 16 * r
    assert [(t.dtype, t.numel()) for t in sent[0].tensors] == [
        (wire, p_sizes), (torch.float32, 20 + 6),
    ]  # fmt: skip
    for i, m in enumerate(sent[1:], start=1):
        assert [(t.dtype, t.numel()) for t in m.tensors] == [(wire, q_sizes if i % 2 else p_sizes)]
    results = [ex.result() for ex in exchanges]
    for s, t in zip(results[0], results[1]):
        torch.testing.assert_close(s, t, rtol=0, atol=0)
    for i in (2, 3):
        torch.testing.assert_close(results[0][i], inputs[0][i] + inputs[1][i], rtol=0, atol=0)
    for i in (0, 1):
        summed = sum(ex.local()[i] for ex in exchanges)
        assert float((results[0][i] - summed).norm()) <= 1e-2 * float(summed.norm())
    for ex in exchanges:  # local() decodes this rank's Q as sent: rounded to the wire dtype
        for b in ex._batches.values():  # type: ignore[attr-defined]
            assert torch.equal(b.q_local, b.q_local.to(wire).float())
    for k in ranks[0].memory:
        torch.testing.assert_close(ranks[1].memory[k], ranks[0].memory[k], rtol=0, atol=0)


def test_more_iterations_fit_better_and_half_precision_costs_little() -> None:
    """A matrix with a slowly decaying spectrum, from a cold start: each power iteration brings
    the rank-2 fit closer to the best one; bf16 on the wire changes the error by under 1%."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 48, generator=gen) @ torch.diag(torch.logspace(0, -1.5, 48))
    best = float(torch.linalg.svdvals(x)[2:].square().sum().sqrt())

    def error(spec: str) -> float:
        exchanges, _ = exchange_all(fake_ranks(spec, 2), [[x], [x]], ["w"])
        return float((exchanges[0].result()[0] - 2 * x).norm()) / 2

    errs = [error(f"powersgd:rank=2,iterations={i}") for i in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2] >= best * (1 - 1e-5), (errs, best)
    for i in (1, 2):
        half = error(f"powersgd:rank=2,iterations={i},precision=bf16")
        assert abs(half - errs[i - 1]) <= 0.01 * errs[i - 1], (i, half, errs[i - 1])


def test_half_precision_single_tensor_payload() -> None:
    """compress (all-gather transports): P and Q in bf16, half the bytes; the decode and the
    sum are in fp32; error feedback subtracts what was sent."""
    x = torch.randn(40, 30)
    c = build("powersgd:rank=3,precision=bf16,iterations=2")
    payload, ctx = c.compress(x, "w")
    assert [t.dtype for t in payload] == [torch.bfloat16] * 2
    assert Compressor.nbytes(payload) == (40 + 30) * 3 * 2
    y = c.decompress(payload, ctx)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, payload[0].float() @ payload[1].float().T, rtol=0, atol=0)
    torch.testing.assert_close(c.aggregate([payload, payload], ctx), 2 * y)
    target = x.clone()
    c.subtract_sent_(target, payload, ctx)
    torch.testing.assert_close(target, x - y, rtol=1e-6, atol=1e-6)
    assert c.memory["w"].dtype == torch.float32


def test_half_precision_and_iterations_state_dict_round_trip() -> None:
    spec = "powersgd:rank=2,precision=bf16,iterations=2"
    gen = torch.Generator().manual_seed(4)
    steps = [[[torch.randn(24, 18, generator=gen)] for _ in range(2)] for _ in range(4)]
    ranks = fake_ranks(spec, 2)
    for inputs in steps[:2]:
        exchange_all(ranks, inputs, ["w"])
    restored = fake_ranks(spec, 2)
    for new, old in zip(restored, ranks):
        new.load_state_dict(old.state_dict())
    for inputs in steps[2:]:
        ea, _ = exchange_all(ranks, inputs, ["w"])
        eb, _ = exchange_all(restored, inputs, ["w"])
        torch.testing.assert_close(ea[0].result()[0], eb[0].result()[0], rtol=0, atol=0)


def test_fp16_single_tensor_payload_stays_finite_for_large_gradients() -> None:
    """The all-gather form moves a power of two from Q to the orthonormal P, so a matrix
    with entries near 1e6 still decodes finite and close to full precision's."""
    g = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 1e6
    full = commhooks.compressor("powersgd:rank=2")
    half = commhooks.compressor("powersgd:rank=2,precision=fp16")
    want = full.decompress(*full.compress(g, key="k"))
    payload, ctx = half.compress(g, key="k")
    assert all(t.dtype == torch.float16 for t in payload)
    got = half.decompress(payload, ctx)
    assert torch.isfinite(got).all()
    assert float((got - want).norm()) < 1e-2 * float(want.norm())
