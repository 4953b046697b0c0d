"""Reliability: a skipped step changes nothing, resumes are exact or refused, and every
rank mismatch is named instead of hanging or crashing. Each case runs on real gloo processes
under a bounded deadline, so a hang fails its test.

The cases, with where each is tested:

1. A NaN on one rank in one bucket of several: the buckets exchanged before it change no
   error feedback (here, for each non-finite check, with coalescing and with ``fallback``;
   Horovod's mixed-dtype optimizer in tests/horovod/test_horovod.py).
2. The hook registered on one rank only: the hooked rank names the missing rank (here).
3. A wrapper, or ``check_config``, on one rank only: every rank raises (here).
4. Complex parameters and 5. sparse gradients: refused at registration (here).
6. Resume: the fallback's settled paths are checkpointed (tests/ddp/test_fallback.py); the
   ``module.`` prefix is mapped and other names refused; another world size is refused or
   warned about (here).
7. Federated: a zero sample count and a non-finite round (tests/federated/test_federated.py).
8. A spec that repeats a field (tests/test_registry.py).
9. Bounds and error paths: PowerSGD's ``iterations`` cap, a 100,000-character spec, a bad
   ``COMMHOOKS_KERNELS`` at registration, an exception inside the hook raised as itself (here);
   ``uniform:bits=1``'s documented error (tests/compressors/test_uniform.py).
10. PowerSGD in fp16 with gradients near 1e6: finite, widened rounds counted (here; the
    all-gather form in tests/compressors/test_powersgd.py).
11. compress_updates: an optimizer over part of the model, a group added later, a GradScaler
    that overflows on one rank only (here).
12. Ranks that disagree on the topology, or on the launcher's ranks per node (here).
13. Framework resumes keep the hook state bit for bit, or warn (tests/integrations/).
"""

from __future__ import annotations

import pytest
import torch
from _reliability_workers import large_gradients, topology_cases, updates_holes
from _workers import (
    make_model,
    one_rank_hooked,
    run_cases,
    run_cases_per_rank,
    train_alone,
)
from test_hooks import assert_replicas_identical, ours, per_case
from torch import nn

import commhooks.ddp
from commhooks.ddp import CompressionState

# -- 1. a skipped step is one transaction -----------------------------------------------------


@pytest.mark.parametrize("check", ["host", "device"])
def test_a_nan_in_the_last_bucket_rolls_back_the_earlier_buckets_feedback(
    run_ranks, check: str
) -> None:
    """One NaN in the first layer's gradient (DDP's last bucket) on one rank: the buckets
    exchanged before it were finite and compressed, but the step is skipped, so their
    error-feedback changes are rolled back with the rest (fused and op-by-op paths), whether
    the step is decided on the host or on the device."""
    specs = ["topk:ratio=0.1", "powersgd", "sign", "fp16", "randomk", "uniform:shared_scale=true"]
    cases = [{"hook": ours(s, nonfinite_check=check), "steps": 5, "nan_at": 3} for s in specs]
    for spec, res in zip(specs, per_case(run_ranks(run_cases, 2, cases))):
        for rank in res:
            assert rank["finite"] == [True, True, True, False, True], spec
            assert rank["params"][3] == rank["params"][2], spec
            assert rank["ef"][3] == rank["ef"][2], spec
            assert rank["ef"][4] != rank["ef"][3], spec
        assert_replicas_identical(res, spec)


@pytest.mark.parametrize(
    "options", [{"coalesce": True}, {"fallback": "auto", "fallback_probes": 1}]
)
def test_a_nan_rolls_back_feedback_with_coalescing_or_fallback(run_ranks, options: dict) -> None:
    """The same NaN with the buckets exchanged together, or each timed against a dense
    all-reduce first (probes and settled paths alike): nothing in memory changes."""
    specs = ["topk:ratio=0.1", "powersgd"]
    cases = [{"hook": ours(s, **options), "steps": 5, "nan_at": 3} for s in specs]
    for spec, res in zip(specs, per_case(run_ranks(run_cases, 2, cases))):
        for rank in res:
            assert rank["finite"] == [True, True, True, False, True], spec
            assert rank["params"][3] == rank["params"][2], spec
            assert rank["ef"][3] == rank["ef"][2], spec
            assert rank["stats"].nonfinite_steps == 1, spec
        assert_replicas_identical(res, spec)


# -- 2. and 3. what changes the collectives on one rank only ----------------------------------


def test_a_hook_on_one_rank_only_names_the_missing_rank(run_ranks) -> None:
    """Rank 0 registers the hook, rank 1 runs plain DDP: rank 0 raises within its
    join_timeout_s, naming rank 1, instead of waiting out the process group's timeout (60 s
    here); rank 1 then fails as its peer leaves."""
    res = run_ranks(one_rank_hooked, 2, 3.0, deadline=120)
    assert "rank(s) [1] of the group [0, 1] did not register" in res[0]["error"], res
    assert res[0]["seconds"] < 45, res
    assert res[1]["error"], res


@pytest.mark.parametrize(
    ("mine", "other"),
    [
        ({"wrapper": "fp16"}, {}),  # a half-precision wrapper on one rank only
        ({"check_config": False, "coalesce": True}, {"check_config": True}),
    ],
)
def test_what_changes_the_collectives_on_one_rank_raises_on_every_rank(
    run_ranks, mine: dict, other: dict
) -> None:
    """A wrapper on one rank, or another option on a rank that skips the check: every rank
    raises, naming the mismatch, instead of a crash ("data size doesn't match") or a hang."""
    cases = []
    for opts in (mine, other):
        opts = dict(opts)
        wrapper = opts.pop("wrapper", None)
        cases.append({"hook": ours("topk", **opts), "wrapper": wrapper, "steps": 2,
                      "may_fail": True})  # fmt: skip
    res = run_ranks(run_cases_per_rank, 2, cases, deadline=120)
    assert all("ranks disagree" in r[0].get("error", "") for r in res), res


def test_check_config_on_some_ranks_only_trains_normally(run_ranks) -> None:
    """Every rank takes part in the first step's check whatever its check_config, so ranks
    that differ only in it line up (it used to hang) and train as one."""
    cases = [{"hook": ours("topk", check_config=c), "steps": 3} for c in (True, False)]
    res = [r[0] for r in run_ranks(run_cases_per_rank, 2, cases, deadline=120)]
    assert "error" not in res[0] and "error" not in res[1]
    assert_replicas_identical(res, "check_config on one rank")


# -- 4. and 5. gradients the compressors cannot carry -----------------------------------------


def test_complex_parameters_are_refused_at_registration(world_of_one: None) -> None:
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match=r"parameter 'module\.weight' is torch\.complex64"):
        commhooks.ddp.register(ddp, "identity")


def test_sparse_embeddings_are_refused_at_registration(world_of_one: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Embedding(10, 4, sparse=True)))
    with pytest.raises(ValueError, match="sparse=True"):
        commhooks.ddp.register(ddp, "topk")


# -- 6. resume is exact or refused -------------------------------------------------------------


def test_saved_memory_follows_the_module_prefix_or_is_refused(world_of_one: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model())
    state = commhooks.ddp.register(ddp, "topk:ratio=0.1", min_numel=0)
    train_alone(ddp, 2)
    saved = state.state_dict()
    assert saved["names"] and all(n.startswith("module.") for n in saved["names"])
    # The bare module's names lack DDP's prefix: the memory is renamed, not dropped.
    bare = CompressionState("topk:ratio=0.1", model=ddp.module, min_numel=0)
    bare.load_state_dict(saved)
    for k, v in saved["feedback"]["residuals"].items():
        assert torch.equal(bare.feedback.residual(k.removeprefix("module.")), v)
    # No names to match (built without a model): refused, not silently empty.
    with pytest.raises(ValueError, match="state has none yet"):
        CompressionState("topk:ratio=0.1", min_numel=0).load_state_dict(saved)
    other = CompressionState("topk:ratio=0.1", model=nn.Linear(3, 3), min_numel=0)
    with pytest.raises(ValueError, match="not in this model"):
        other.load_state_dict(saved)


def test_another_world_size_is_refused_or_warned(world_of_one: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model())
    state = commhooks.ddp.register(ddp, "uniform", transport="reducescatter", min_numel=0)
    train_alone(ddp, 1)
    saved = {**state.state_dict(), "world_size": 2}
    fresh = CompressionState("uniform", model=ddp, transport="reducescatter", min_numel=0)
    with pytest.raises(ValueError, match="saved by a 2-rank job, loading into 1 ranks"):
        fresh.load_state_dict(saved)
    topk = commhooks.ddp.CompressionState("topk", model=ddp, min_numel=0)
    other = {**topk.state_dict(), "world_size": 3, "rank": 2}
    with pytest.warns(UserWarning) as seen:
        commhooks.ddp.CompressionState("topk", model=ddp, min_numel=0).load_state_dict(other)
    messages = " | ".join(str(w.message) for w in seen)
    assert "saved by a 3-rank job loaded into 1 ranks" in messages
    assert "rank 0 loads the error-feedback memory rank 2 saved" in messages


# -- bounds and error paths --------------------------------------------------------------------


def test_power_iterations_are_bounded_with_a_reason() -> None:
    commhooks.compressor("powersgd:iterations=10")
    with pytest.raises(ValueError, match=r"iterations=100000: must be <= 10; each adds two"):
        commhooks.compressor("powersgd:iterations=100000")


def test_long_values_are_cut_in_messages() -> None:
    """A 100,000-character spec, field or value: the message names it, cut, with its length."""
    for spec in ("x" * 100_000, "topk:" + "ratio=0.1," * 10_000, "topk:ratio=" + "x" * 100_000,
                 "topk:ratio=0.1,k" + "x" * 100_000 + "=1"):  # fmt: skip
        with pytest.raises(ValueError) as err:
            commhooks.compressor(spec)
        assert len(str(err.value)) < 500, str(err.value)[:600]
        assert "characters)" in str(err.value), str(err.value)[:600]
    with pytest.raises(ValueError, match="ratio=inf: must be finite"):
        commhooks.compressor("topk:ratio=" + "9" * 100_000)


def test_a_bad_kernel_choice_is_refused_at_registration(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMHOOKS_KERNELS", "cuda")
    ddp = nn.parallel.DistributedDataParallel(make_model())
    with pytest.raises(
        ValueError, match="COMMHOOKS_KERNELS='cuda': expected auto, torch or triton"
    ):
        commhooks.ddp.register(ddp, "sign", min_numel=0)


def test_an_error_inside_the_hook_reaches_backward_as_itself(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that fails on the communication worker (here the kernel switch, changed after
    registration) raises its own exception type and message from backward, not DDP's
    "Unable to cast ... to Tensor"; so does a failure in a bucket before the last."""
    ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.01)
    commhooks.ddp.register(ddp, "sign", min_numel=0)
    train_alone(ddp, 1)
    monkeypatch.setenv("COMMHOOKS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="COMMHOOKS_KERNELS='cuda'") as err:
        train_alone(ddp, 1, first=1)
    assert "Unable to cast" not in str(err.value)


# -- PowerSGD in fp16 --------------------------------------------------------------------------


def test_fp16_powersgd_keeps_large_finite_gradients_finite(run_ranks) -> None:
    """The loss times 1e7 (gradients up to about 1e6): P and Q pass fp16's 65504, and the
    averages are still finite on every rank, equal to full precision's up to fp16 rounding,
    with the widened rounds counted and no step skipped; bf16 needs no widening."""
    specs = ["powersgd:rank=2", "powersgd:rank=2,precision=fp16", "powersgd:rank=2,precision=bf16"]
    res = run_ranks(large_gradients, 2, specs, 1e7)
    for rank in res:
        full, half, bf16 = (rank[s] for s in specs)
        assert max(g.abs().max() for g in full["grads"][0]) > 5e5
        for step_full, step_half in zip(full["grads"], half["grads"]):
            for f, h in zip(step_full, step_half):
                assert torch.isfinite(h).all()
                assert float((h - f).norm()) <= 2e-2 * float(f.norm()) + 1e-3
        assert half["widened"] > 0 and half["stats"].nonfinite_steps == 0
        assert bf16["widened"] == 0 and all(torch.isfinite(g).all() for g in bf16["grads"][-1])
        assert half["stats"].wire_bytes < half["stats"].raw_bytes
    for a, b in zip(res[0][specs[1]]["grads"][-1], res[1][specs[1]]["grads"][-1]):
        assert torch.equal(a, b)


# -- compress_updates: what it cannot average by itself ----------------------------------------


def test_compress_updates_refuses_a_partial_optimizer_joins_added_groups_and_agrees_on_skips(
    run_ranks,
) -> None:
    """An optimizer missing the last layer is refused, naming it, on every rank; a layer
    unfrozen and added with add_param_group has its updates averaged (replicas identical);
    a GradScaler that overflows on rank 1 only skips that step on every rank (no gloo abort),
    and training goes on with identical replicas."""
    res = run_ranks(updates_holes, 2, deadline=240)
    for rank in res:
        assert "does not own the model's trainable parameters 4.weight, 4.bias" in rank["partial"]
        assert rank["added_moved"] and rank["added_equal"], rank
        assert rank["scaler_skipped"] and rank["scaler_moved"], rank
        assert rank["scaler_finite"] and rank["scaler_equal"], rank
        # The skipped step counts, as the DDP hook counts a step some rank overflowed on.
        assert rank["steps"] == 5 and rank["skipped"] == 1, rank
    assert res[1]["scales"][2] == res[1]["scales"][1] / 2  # rank 1's scaler backed off


# -- topology agreement ------------------------------------------------------------------------


def test_ranks_that_disagree_on_topology_raise_the_same_message_on_every_rank(run_ranks) -> None:
    """One rank hierarchical and one flat; one auto (under a launcher) and one flat; the
    launcher's ranks per node set on one node only: every rank raises the same "ranks
    disagree on topology" message, naming each rank's settings, before any topology
    collective (not a placement error made of another rank's data, nor a gloo error). Ranks
    that agree still train, hierarchically where asked."""

    def env(size: int, local: int) -> dict[str, str]:
        return {"LOCAL_WORLD_SIZE": str(size), "LOCAL_RANK": str(local)}

    hier, flat, auto = ({"topology": t} for t in ("hierarchical", "flat", "auto"))
    cases = [
        [(hier, env(2, 0)), (flat, env(2, 1))],
        [(auto, env(2, 0)), (flat, env(2, 1))],
        [(auto, env(1, 0)), (auto, {})],
        [(hier, env(2, 0)), (hier, env(2, 1))],
        [(auto, env(2, 0)), (auto, env(1, 0))],
    ]
    res = run_ranks(topology_cases, 2, cases, deadline=240)
    wanted = [
        "rank(s) [0]: topology='hierarchical', LOCAL_WORLD_SIZE=2; rank(s) [1]: topology='flat'",
        "rank(s) [0]: topology='auto', LOCAL_WORLD_SIZE set; rank(s) [1]: topology='flat'",
        "rank(s) [0]: topology='auto', LOCAL_WORLD_SIZE set; rank(s) [1]: topology='auto', no "
        "launcher ranks per node",
    ]
    for i, text in enumerate(wanted):
        errors = [r[i].get("error", "") for r in res]
        assert errors[0] == errors[1], errors
        assert f"RuntimeError: commhooks: ranks disagree on topology ({text})" in errors[0]
    assert [r[3] for r in res] == [{"layout": "hierarchical:1x2", "ratio": r[3]["ratio"]}
                                   for r in res]  # fmt: skip
    assert all(r[3]["ratio"] > 1 for r in res)
    # Nodes of different sizes under "auto": no disagreement, a flat exchange.
    assert [r[4]["layout"] for r in res] == ["flat", "flat"]
