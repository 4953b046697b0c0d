"""The DDP hook on real gloo processes: replicas, equivalence with torch's hooks, checkpoints,
DDP's modes, bad configs and overflow."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _workers import overlap_run, run_cases, run_cases_per_rank

import commhooks

#: every registered compressor at its defaults, plus settings that take other paths
SPECS = [
    *commhooks.available(),
    "uniform:shared_scale=true",
    "uniform:bits=4,entropy=true",
    "topk:ratio=0.05,index_coding=bitmap",
    "powersgd:rank=2",
]
#: explicit transports beyond "auto" (which is allreduce for summable specs, else allgather)
EXTRA_TRANSPORTS = [
    ("identity", "reducescatter"),
    ("fp16", "allgather"),
    ("randomk", "allgather"),
    ("uniform", "reducescatter"),
    ("qsgd", "reducescatter"),
    ("sign", "reducescatter"),
    ("ternary", "reducescatter"),
    ("topk", "reducescatter"),
]
#: options shared by the tests: compress the 10x64 output layer too, and every tensor even
#: where it does not pay (lossless top-k), so the transports are what is tested
OPTS = {"min_numel": 256, "min_ratio": 0.0}


def ours(spec: Any, **options: Any) -> tuple[str, Any, dict[str, Any]]:
    return ("ours", spec, {**OPTS, **options})


def assert_replicas_identical(results: list[dict[str, Any]], label: str = "") -> None:
    """Every rank holds the same parameters after every step."""
    for r, res in enumerate(results[1:], start=1):
        for step, (a, b) in enumerate(zip(results[0]["params"], res["params"])):
            assert a == b, f"{label}: rank {r} differs from rank 0 after step {step}"


def per_case(results: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Transpose ranks x cases into cases x ranks."""
    return [list(c) for c in zip(*results)]


def test_every_compressor_and_transport_keeps_replicas_identical(run_ranks) -> None:
    cases = [(s, "auto") for s in SPECS] + EXTRA_TRANSPORTS
    results = per_case(
        run_ranks(
            run_cases,
            2,
            [{"hook": ours(s, transport=t), "steps": 10, "bucket_cap_mb": 0.005} for s, t in cases],
        )
    )
    for (spec, transport), res in zip(cases, results):
        label = f"{spec} over {transport}"
        assert_replicas_identical(res, label)
        assert all(res[0]["finite"]), label
        stats = res[0]["stats"]
        assert stats.steps == 10 and stats.raw_bytes > 0, label
        if spec == "identity" and transport == "auto":
            # All-reduced in place, as plain DDP does: not a byte more (no flag rides along).
            assert stats.wire_bytes == stats.raw_bytes
        elif transport != "reducescatter":
            # Casts halve the bytes; threshold's saving depends on the gradients' scale;
            # everything else at its defaults saves more.
            floor = {"fp16": 1.9, "bf16": 1.9, "threshold": 1.0}.get(spec, 2.5)
            assert stats.ratio > floor, (label, stats)


STRESS_STEPS = 20


def test_stress_four_ranks_many_buckets_every_compressor(run_ranks) -> None:
    """20 steps x 4 ranks x tiny buckets per compressor: no crash, no hang (the fixture's
    deadline), replicas identical after every step."""
    specs = [*commhooks.available(), "uniform:shared_scale=true"]
    extra = [("qsgd", "reducescatter"), ("uniform", "reducescatter")]
    cases = [(s, "auto") for s in specs] + extra
    results = per_case(
        run_ranks(
            run_cases,
            4,
            [
                {"hook": ours(s, transport=t), "steps": STRESS_STEPS, "bucket_cap_mb": 0.005}
                for s, t in cases
            ],
            deadline=600,
        )
    )
    for (spec, transport), res in zip(cases, results):
        assert_replicas_identical(res, f"{spec} over {transport}")
        assert len(res[0]["params"]) == STRESS_STEPS
        assert res[0]["stats"].steps == STRESS_STEPS


@pytest.mark.parametrize("world", [2, 4])
def test_matches_torch_builtin_hooks(run_ranks, world: int) -> None:
    # torch's hooks cast every tensor: so must ours, for the same result.
    every = {"min_numel": 0, "compress_1d": True}
    pairs = [
        (ours("identity", **every), None, ("torch", "allreduce_hook")),
        (ours("fp16", **every), None, ("torch", "fp16_compress_hook")),
        (ours("bf16", **every), None, ("torch", "bf16_compress_hook")),
        (ours("identity", **every), "fp16", ("torch", "fp16_compress_hook")),
        (ours("identity", **every), "bf16", ("torch", "bf16_compress_hook")),
    ]
    cases = []
    for mine, wrapper, theirs in pairs:
        cases.append({"hook": mine, "wrapper": wrapper, "steps": 4, "keep_grads": True})
        cases.append({"hook": theirs, "steps": 4, "keep_grads": True})
    results = per_case(run_ranks(run_cases, world, cases))
    # Both round each rank's gradient to the half type, but torch sums in half, where ours
    # sums in fp32: apart by the half type's rounding of the largest summand (cancellation
    # leaves that absolute error on small sums). Dense: ours all-reduces the step's buckets
    # together (coalesce), so the ring adds more than two ranks' values in another order.
    half_ulp = {
        "allreduce_hook": 2**-23,
        "fp16_compress_hook": 2**-10,
        "bf16_compress_hook": 2**-7,
    }
    for i, (mine, wrapper, theirs) in enumerate(pairs):
        got, want = results[2 * i][0], results[2 * i + 1][0]
        for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
            for a, b in zip(g, w):
                torch.testing.assert_close(
                    a,
                    b,
                    rtol=half_ulp[theirs[1]],
                    atol=2 * half_ulp[theirs[1]] * float(b.abs().max()),
                    msg=lambda m, label=f"{mine[1]}+{wrapper} vs {theirs[1]}, step {step}": (
                        f"{label}: {m}"
                    ),
                )


def test_lossless_settings_give_the_dense_result(run_ranks) -> None:
    lossless = [
        ("topk:ratio=1.0", "auto"),
        ("topk:ratio=1.0", "reducescatter"),
        ("randomk:ratio=1.0", "auto"),
        ("identity", "auto"),
        ("identity", "reducescatter"),
        ("identity", "allgather"),
    ]
    cases = [{"hook": None, "steps": 4, "keep_grads": True}] + [
        {"hook": ours(s, transport=t), "steps": 4, "keep_grads": True} for s, t in lossless
    ]
    results = per_case(run_ranks(run_cases, 2, cases))
    dense = results[0][0]["grads"]
    for (spec, transport), res in zip(lossless, results[1:]):
        for g, w in zip(res[0]["grads"], dense):
            for a, b in zip(g, w):
                torch.testing.assert_close(
                    a, b, msg=lambda m, label=f"{spec} over {transport}": f"{label}: {m}"
                )


def test_coalesced_buckets_match_bucket_by_bucket(run_ranks) -> None:
    """``coalesce`` holds the buckets until the last and exchanges them with one set of
    collectives per step: the same gradients as one exchange per bucket (the default)."""
    specs = ["topk:ratio=0.05", "powersgd", "sign", "uniform:shared_scale=true"]
    cases = [
        {"hook": ours(spec, coalesce=c), "steps": 4, "keep_grads": True}
        for spec in specs
        for c in (True, False)
    ]
    results = per_case(run_ranks(run_cases, 2, cases))
    for i, spec in enumerate(specs):
        held, each = results[2 * i], results[2 * i + 1]
        assert_replicas_identical(held, spec)
        for g, w in zip(held[0]["grads"], each[0]["grads"]):
            for a, b in zip(g, w):
                torch.testing.assert_close(a, b, msg=lambda m, spec=spec: f"{spec}: {m}")
        buckets = each[0]["stats"].collectives / held[0]["stats"].collectives
        assert buckets > 1.5, f"{spec}: {buckets:.1f}x the collectives bucket by bucket"
    # top-k: the small tensors' all-reduce and one all-gather a step. PowerSGD: the small
    # tensors and the non-finite flag ride in P's all-reduce, then Q's: two a step.
    assert results[0][0]["stats"].collectives == 2 * 4
    assert results[2][0]["stats"].collectives == 2 * 4


@pytest.mark.parametrize("rank", [1, 2])
def test_powersgd_error_matches_torch_powersgd_hook(run_ranks, rank: int) -> None:
    """Same gradients every step (lr 0): after warm-started power iterations both hooks'
    relative errors against the dense average agree."""
    common = {"steps": 8, "lr": 0.0, "bucket_cap_mb": 25, "errors": True}
    cases = [
        {"hook": ours(f"powersgd:rank={rank}", error_feedback=False, min_numel=0), **common},
        {"hook": ("powersgd", rank), **common},
    ]
    mine, theirs = (res[0]["errors"] for res in per_case(run_ranks(run_cases, 2, cases)))
    # torch's hook is dense for its first two steps (start_powerSGD_iter=2).
    assert theirs[0] < 1e-6 and mine[0] > 0.01
    torch.testing.assert_close(mine[-1], theirs[-1], rtol=0.03, atol=1e-4)


CHECKPOINTED = [
    ("topk:ratio=0.05", "auto"),
    ("powersgd", "auto"),
    ("qsgd", "auto"),
    ("randomk", "auto"),
    ("uniform", "reducescatter"),
]


def test_checkpoint_resume_is_bit_exact(run_ranks, tmp_path) -> None:
    k = 4
    whole, first, second = [], [], []
    for i, (spec, transport) in enumerate(CHECKPOINTED):
        path = str(tmp_path / f"ckpt{i}-{{rank}}.pt")
        hook = ours(spec, transport=transport)
        whole.append({"hook": hook, "steps": 2 * k})
        first.append({"hook": hook, "steps": k, "save": path})
        second.append({"hook": hook, "steps": k, "first_step": k, "load": path})
    uninterrupted = per_case(run_ranks(run_cases, 2, whole + first))[: len(whole)]
    resumed = per_case(run_ranks(run_cases, 2, second))
    for (spec, transport), a, b in zip(CHECKPOINTED, uninterrupted, resumed):
        for rank in range(2):
            assert a[rank]["params"][k:] == b[rank]["params"], f"{spec} over {transport}"
            for x, y in zip(a[rank]["final"], b[rank]["final"]):
                assert torch.equal(x, y)
        # Stats carry over (wire bytes and collective counts may differ a little: a fresh
        # DDP starts from its initial buckets, which it rebuilds after one step).
        for f in ("steps", "raw_bytes"):
            assert getattr(a[0]["stats"], f) == getattr(b[0]["stats"], f), (spec, f)


DDP_MODES = [
    {"accumulate": 3},
    {"model": "unused", "ddp": {"find_unused_parameters": True}},
    {"ddp": {"static_graph": True}},
]


@pytest.mark.parametrize("mode", DDP_MODES, ids=["no_sync", "find_unused", "static_graph"])
def test_ddp_modes(run_ranks, mode: dict[str, Any]) -> None:
    """Lossless settings equal plain DDP in the same mode; a lossy one keeps replicas
    identical, with error feedback keyed by parameter name."""
    cases = [
        {**mode, "hook": None, "steps": 4, "keep_grads": True},
        {**mode, "hook": ours("topk:ratio=1.0"), "steps": 4, "keep_grads": True},
        {**mode, "hook": ours("topk:ratio=0.1"), "steps": 6},
        {**mode, "hook": ours("powersgd"), "steps": 6},
    ]
    dense, lossless, topk, powersgd = per_case(run_ranks(run_cases, 2, cases))
    for g, w in zip(lossless[0]["grads"], dense[0]["grads"]):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b)
    for res in (topk, powersgd):
        assert_replicas_identical(res)
    names = {"module.0.weight", "module.2.weight", "module.4.weight"}
    if mode.get("model") == "unused":
        names = {"module.body.0.weight", "module.head.weight", "module.unused.weight"}
    assert set(topk[0]["ef_keys"]) <= names and topk[0]["ef_keys"]


def test_mismatched_configs_raise_on_every_rank(run_ranks) -> None:
    mismatches = [
        ["topk:ratio=0.01", "topk:ratio=0.02"],
        ["uniform:bits=8", "uniform:bits=4"],
        ["sign", "ternary"],
    ]
    cases = [{"hook": ours(m), "steps": 2, "may_fail": True} for m in mismatches]
    for res in per_case(run_ranks(run_cases, 2, cases)):
        for rank in res:
            assert "ranks disagree" in rank.get("error", ""), rank


def test_mismatched_start_iter_raises(run_ranks) -> None:
    case = {"hook": ("ours", "topk", {"start_iter": 0}), "steps": 2, "may_fail": True}
    other = {"hook": ("ours", "topk", {"start_iter": 2}), "steps": 2, "may_fail": True}
    res = run_ranks(run_cases_per_rank, 2, [case, other])
    assert all("ranks disagree" in r[0].get("error", "") for r in res), res


def test_nonfinite_gradients_reach_gradscaler_and_leave_feedback_alone(run_ranks) -> None:
    specs = ["topk:ratio=0.1", "powersgd", "uniform:bits=4", "sign", "uniform:shared_scale=true"]
    cases = [{"hook": ours(s), "steps": 6, "inf_at": 3} for s in specs]
    # identity all-reduces in place (nothing to roll back) and still counts the step, with
    # the check on the host (the CPU default) and on the device.
    specs += ["identity", "identity (device check)"]
    cases += [
        {"hook": ours("identity", nonfinite_check=check), "steps": 6, "inf_at": 3}
        for check in ("host", "device")
    ]
    for spec, res in zip(specs, per_case(run_ranks(run_cases, 2, cases))):
        for rank in res:
            assert rank["finite"] == [True, True, True, False, True, True], spec
            assert rank["scale"][3] < rank["scale"][2], spec  # GradScaler skipped the step
            assert rank["params"][3] == rank["params"][2], spec
            assert rank["ef"][3] == rank["ef"][2], spec
            assert rank["stats"].nonfinite_steps == 1
        assert_replicas_identical(res, spec)


@pytest.mark.parametrize("spec", ["sign", "powersgd", "uniform:shared_scale=true", "topk"])
def test_the_hook_returns_before_the_exchange_and_matches_the_synchronous_engine(
    run_ranks, spec: str
) -> None:
    """With the worker held up, every bucket's future but the last's is still pending when the
    hook returns (backward goes on; the last waits for the step's jobs); the averaged
    gradients equal those of the engine called bucket by bucket on the autograd thread, bit
    for bit, over several steps of error feedback."""
    res = run_ranks(overlap_run, 2, spec, 4)
    for rank in res:
        over, sync = rank["overlap"], rank["sync"]
        assert len(over["pending"]) >= 3 and all(over["pending"])  # several buckets a step
        assert over["stats"].wire_bytes < over["stats"].raw_bytes
        for a_step, b_step in zip(over["grads"], sync["grads"]):
            for a, b in zip(a_step, b_step):
                assert torch.equal(a, b), spec


def test_start_iter_steps_are_dense(run_ranks) -> None:
    cases = [
        {"hook": None, "steps": 4, "keep_grads": True},
        {"hook": ours("topk:ratio=0.01", start_iter=3), "steps": 4, "keep_grads": True},
    ]
    dense, topk = per_case(run_ranks(run_cases, 2, cases))
    for step in range(3):
        for a, b in zip(topk[0]["grads"][step], dense[0]["grads"][step]):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(topk[0]["grads"][3], dense[0]["grads"][3]))


def test_half_precision_buckets_keep_fp32_feedback(run_ranks) -> None:
    cases = [{"hook": ours("topk:ratio=0.1"), "wrapper": w, "steps": 5} for w in ("fp16", "bf16")]
    for res in per_case(run_ranks(run_cases, 2, cases)):
        assert_replicas_identical(res)
        assert res[0]["ef_dtypes"] == ["torch.float32"]
