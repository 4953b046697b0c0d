"""Error feedback: the exact invariant, fp32 memory, non-finite safety, DGC options, checkpoints."""

from __future__ import annotations

import ast
import itertools
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks import ErrorFeedback, FeedbackConfig
from commhooks.feedback import all_finite
from commhooks.testing import simulate_allreduce

EF_SPECS = ["topk:ratio=0.1", "randomk:ratio=0.2", "dgc:ratio=0.05", "fp16", "bf16"]


def step(ef: ErrorFeedback, key: str, g: torch.Tensor) -> torch.Tensor:
    payload, ctx = ef.compress(key, g)
    return ef.compressor.decompress(payload, ctx)


@pytest.mark.parametrize("spec", EF_SPECS)
def test_invariant_holds_exactly_over_steps(spec: str) -> None:
    ef = ErrorFeedback(spec)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(300, generator=gen)
        old = ef.residual("w")
        old = torch.zeros(300) if old is None else old.clone()
        sent = step(ef, "w", g)
        new = ef.residual("w")
        assert new is not None and new.dtype == torch.float32
        # The residual is defined as exactly what was not sent ...
        assert torch.equal(new, (g + old) - sent.float())
        # ... so input + old residual == sent + new residual, to the last rounding of one add.
        torch.testing.assert_close(g + old, sent.float() + new, rtol=0, atol=1e-6)


@settings(max_examples=40)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=200),
    spec=st.sampled_from(EF_SPECS),
)
def test_hypothesis_invariant(values: list[float], spec: str) -> None:
    ef = ErrorFeedback(spec)
    g = torch.tensor(values)
    sent1 = step(ef, "w", g)
    r1 = ef.residual("w")
    sent2 = step(ef, "w", g)
    r2 = ef.residual("w")
    assert r1 is not None and r2 is not None
    assert torch.equal(r1, g - sent1.float())
    assert torch.equal(r2, (g + r1) - sent2.float())


def test_telescoping_nothing_is_lost_only_delayed() -> None:
    ef = ErrorFeedback("topk:ratio=0.05")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(1000, generator=gen) for _ in range(20)]
    sent = sum(step(ef, "w", g) for g in grads)
    torch.testing.assert_close(sent + ef.residual("w"), sum(grads), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_residual_is_fp32_and_payload_keeps_the_gradient_dtype(dtype: torch.dtype) -> None:
    ef = ErrorFeedback("topk:ratio=0.1")
    payload, ctx = ef.compress("w", torch.randn(100).to(dtype))
    assert payload[0].dtype == dtype and ctx.dtype == dtype
    res = ef.residual("w")
    assert res is not None and res.dtype == torch.float32


def test_fp64_gradients_keep_fp64_residuals() -> None:
    ef = ErrorFeedback("topk:ratio=0.1")
    ef.compress("w", torch.randn(100, dtype=torch.float64))
    res = ef.residual("w")
    assert res is not None and res.dtype == torch.float64


def test_keys_are_independent_and_shapes_checked() -> None:
    ef = ErrorFeedback("topk:ratio=0.1")
    ef.compress("a", torch.randn(10))
    ef.compress("b", torch.randn(20))
    assert ef.residual("a").shape == (10,) and ef.residual("b").shape == (20,)
    with pytest.raises(RuntimeError, match="'a'"):
        ef.compress("a", torch.randn(11))


@pytest.mark.parametrize("spec", EF_SPECS)
def test_non_finite_reaches_the_output_and_spares_the_residual(spec: str) -> None:
    ef = ErrorFeedback(spec)
    step(ef, "w", torch.randn(500))
    before = ef.residual("w").clone()
    bad = torch.randn(500)
    bad[7] = float("inf")
    assert not torch.isfinite(step(ef, "w", bad)).all()
    assert torch.equal(ef.residual("w"), before)


def test_dgc_momentum_correction_matches_the_paper() -> None:
    m = 0.9
    ef = ErrorFeedback("topk:ratio=0.1,mode=exact", momentum=m)
    gen = torch.Generator().manual_seed(2)
    u = torch.zeros(200)
    v = torch.zeros(200)
    for _ in range(6):
        g = torch.randn(200, generator=gen)
        u = m * u + g
        v = v + u
        sent = step(ef, "w", g)
        mask = v.abs() >= v.abs().topk(20).values.min()
        torch.testing.assert_close(sent, torch.where(mask, v, torch.zeros_like(v)))
        v = v.masked_fill(mask, 0)
        u = u.masked_fill(mask, 0)  # momentum-factor masking
        torch.testing.assert_close(ef.residual("w"), v)


def test_decay_scales_the_residual() -> None:
    g = torch.randn(100)
    plain, decayed = ErrorFeedback("topk:ratio=0.1"), ErrorFeedback("topk:ratio=0.1", decay=0.5)
    step(plain, "w", g)
    step(decayed, "w", g)
    torch.testing.assert_close(decayed.residual("w"), 0.5 * plain.residual("w"))


def test_warmup_sparsity_falls_exponentially_to_the_target() -> None:
    ef = ErrorFeedback("dgc:ratio=0.001", warmup_steps=4, warmup_ratio=0.25)
    ratios = []
    for _ in range(6):
        ratios.append(ef.compressor.config.ratio)
        ef.step()
    assert ratios[0] == 0.25 and ratios[4:] == [0.001, 0.001]
    assert all(a > b for a, b in itertools.pairwise(ratios[:5]))
    torch.testing.assert_close(torch.tensor(ratios[2]), torch.tensor((0.25 * 0.001) ** 0.5))


@pytest.mark.parametrize(
    "spec,options,field",
    [
        ("fp16", {"momentum": 0.9}, "momentum"),
        ("fp16", {"warmup_steps": 10}, "warmup_steps"),
        ("topk", {"decay": 0.0}, "decay"),
        ("topk", {"momentum": 1.0}, "momentum"),
        ("topk", {"warmup_ratio": 0.0}, "warmup_ratio"),
        ("topk", {"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_options_name_the_field(spec: str, options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ErrorFeedback(spec, **options)


def test_config_and_options_are_exclusive() -> None:
    with pytest.raises(ValueError, match="options"):
        ErrorFeedback("topk", FeedbackConfig(), decay=0.5)


def test_state_dict_resumes_identically() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(400, generator=gen) for _ in range(8)]
    cfg = dict(momentum=0.5, warmup_steps=3)
    full = ErrorFeedback("dgc:ratio=0.01", **cfg)
    first = ErrorFeedback("dgc:ratio=0.01", **cfg)
    for g in grads[:4]:
        step(full, "w", g)
        full.step()
        step(first, "w", g)
        first.step()
    resumed = ErrorFeedback("dgc:ratio=0.01", **cfg)
    resumed.load_state_dict(first.state_dict())
    for g in grads[4:]:
        a, b = step(full, "w", g), step(resumed, "w", g)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        full.step()
        resumed.step()
    torch.testing.assert_close(full.residual("w"), resumed.residual("w"), rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["fp16", "randomk:ratio=0.3"])
def test_exchange_updates_residuals_from_the_local_contribution(spec: str) -> None:
    world = 3
    efs = [ErrorFeedback(spec) for _ in range(world)]
    grads = [[torch.randn(40), torch.randn(6, 5)] for _ in range(world)]
    exchanges = [ef.exchange(["a", "b"], g, world) for ef, g in zip(efs, grads)]
    simulate_allreduce(exchanges)
    results = [ex.result() for ex in exchanges]
    for ef, ex, g in zip(efs, exchanges, grads):
        for key, gi, li in zip(["a", "b"], g, ex.local()):
            torch.testing.assert_close(ef.residual(key), gi - li.float(), rtol=0, atol=0)
    # The all-reduce sums on the wire (fp16 here), so allow that rounding.
    torch.testing.assert_close(
        results[0][0], sum(ex.local()[0] for ex in exchanges), rtol=1e-3, atol=1e-2
    )


def test_exchange_of_a_non_summable_compressor_is_refused() -> None:
    with pytest.raises(ValueError, match="not summable"):
        ErrorFeedback("topk").exchange(["a"], [torch.randn(4)], 2)


def test_compressor_argument_accepts_every_form() -> None:
    cfg = commhooks.parse_spec("topk:ratio=0.2")
    for arg in ("topk:ratio=0.2", cfg, commhooks.compressor(cfg)):
        assert ErrorFeedback(arg).compressor.config == cfg


def test_momentum_never_aliases_the_gradient() -> None:
    ef = ErrorFeedback("topk:ratio=0.1", momentum=0.5, momentum_masking=False)
    g = torch.randn(200)
    ef.compress("w", g)
    m = ef.state_dict()["momenta"]["w"]
    assert m.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()
    assert ef._momenta["w"].untyped_storage().data_ptr() != g.untyped_storage().data_ptr()


def test_rollback_where_restores_a_residual_popped_this_step() -> None:
    ef = ErrorFeedback("topk:ratio=0.1")
    step(ef, "w", torch.randn(300))
    ef.commit_step()
    before = ef.residual("w").clone()
    ef.journal(True, on_device=True)
    assert ef.pop("w") is not None
    ef.rollback_where(torch.tensor(True))
    assert torch.equal(ef.residual("w"), before)
    ef.journal(True, on_device=True)
    ef.pop("w")
    ef.rollback_where(torch.tensor(False))
    assert not ef.residual("w").any()  # kept removed: zero memory sends what none does


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_sees_inf_nan_and_survives_overflowing_sums(dtype: torch.dtype) -> None:
    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert all_finite(big)  # its sum overflows; the exact check says finite
    assert all_finite(torch.zeros(0, dtype=dtype)) and all_finite(torch.arange(3))
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(1000, dtype=dtype)
        t[517] = bad
        assert not all_finite(t)
    both = torch.ones(10, dtype=dtype)
    both[1], both[2] = float("inf"), float("-inf")
    assert not all_finite(both)


def test_write_residual_keeps_a_non_finite_residual_out_each_way() -> None:
    from commhooks.feedback import write_residual

    c, sent = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5])
    assert torch.equal(write_residual(c.clone(), sent, 0.5), torch.tensor([0.25, 0.75, 1.25]))
    clear = write_residual(c.clone(), lambda t: t.index_fill_(0, torch.tensor([1]), 0.0))
    assert torch.equal(clear, torch.tensor([1.0, 0.0, 3.0]))
    bad = torch.tensor([1.0, float("inf"), 3.0])
    assert write_residual(bad.clone(), sent) is None  # refused on the host
    old = torch.tensor([7.0, 7.0, 7.0])
    write_residual(bad.clone(), sent, keep="device", into=old)  # kept out on the device
    assert torch.equal(old, torch.tensor([7.0, 7.0, 7.0]))
    write_residual(c.clone(), sent, keep="device", into=old)
    assert torch.equal(old, torch.tensor([0.5, 1.5, 2.5]))
    kept = write_residual(bad.clone(), sent, keep="unchecked")  # the step decides elsewhere
    assert kept is not None and not bool(torch.isfinite(kept).all())
    mine = c.clone()
    write_residual(mine, sent, owned=False)
    assert torch.equal(mine, c)  # not this step's memory: left alone
    formed_in_place = bad.clone()  # c was formed in the residual's memory: the old value is gone
    reset = write_residual(formed_in_place, sent, 0.5, keep="reset")
    assert reset is formed_in_place and torch.equal(reset, torch.zeros(3))
    kept_finite = write_residual(c.clone(), sent, 0.5, keep="reset")
    assert torch.equal(kept_finite, torch.tensor([0.25, 0.75, 1.25]))
    full = torch.tensor([2.0, -1.0, 4.0])  # sent in full: the residual is c - c
    write_residual(full, full, into=old, owned=False)
    assert torch.equal(old, torch.zeros(3)) and torch.equal(full, torch.tensor([2.0, -1.0, 4.0]))
    old.fill_(7.0)
    write_residual(bad, bad, into=old, owned=False)
    assert torch.equal(old, torch.full((3,), 7.0))  # inf - inf: refused, the old one stays
    with pytest.raises(ValueError, match=r"keep='reset'.*into must be None"):
        write_residual(c.clone(), sent, keep="reset", into=old)


def test_fused_paths_are_found_along_the_class_hierarchy_and_checked() -> None:
    from commhooks.compressors._sparse import SparseFeedback
    from commhooks.feedback import FusedPath, fused_path, register_fused

    cpu = torch.device("cpu")
    assert isinstance(fused_path(commhooks.compressor("dgc"), cpu), SparseFeedback)
    assert type(fused_path(commhooks.compressor("sign"), cpu)).__name__ == "KernelPath"
    with pytest.raises(ValueError, match="codec"):
        register_fused(int, FusedPath())
    with pytest.raises(ValueError, match="path"):
        register_fused(type(commhooks.compressor("sign")), object())  # type: ignore[arg-type]


def _large_float_literals(root: pathlib.Path) -> list[tuple[str, float]]:
    """(file, value) for every float literal of magnitude at least 1e15 in ``root``'s Python
    files, fp32's largest finite value (a format constant, not a safety bound) aside."""
    fp32_max = float(torch.finfo(torch.float32).max)
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, float):
                continue
            if abs(node.value) >= 1e15 and node.value != fp32_max:
                found.append((path.relative_to(root).as_posix(), node.value))
    return found


def test_the_finiteness_thresholds_are_written_in_one_module() -> None:
    """Whether a step's values are safe to commit is decided against bounds written once, in
    feedback/residual.py; every other module uses those names (the native kernels report
    the statistics that Python checks against them)."""
    root = pathlib.Path(commhooks.__file__).resolve().parent
    found = _large_float_literals(root)
    assert {f for f, _ in found} == {"feedback/residual.py"}, found
    assert sorted(v for _, v in found) == [1e18, 1e29, 1e38]


def test_large_float_literals_finds_one_in_a_function(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.py").write_text("def f(x):\n    return x < 1e30\n")
    (tmp_path / "b.py").write_text("M = 3.4028234663852886e38\nN = 1e3\n")
    assert _large_float_literals(tmp_path) == [("a.py", 1e30)]
