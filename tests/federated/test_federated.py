"""FederatedAverager on 4 real gloo processes: replicas, the H = 1 equivalence, partial
participation, checkpoints, bad configs."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from _fed_workers import bad_samples, dense_sgd, rounds, skipped_end_round

from commhooks.ddp import HookOptions
from commhooks.federated import FedConfig, FederatedAverager

WORLD = 4


def test_replicas_stay_identical_after_every_round(run_ranks) -> None:
    cases = [
        {"spec": "topk:ratio=0.05", "rounds": 4,
         "config": {"local_steps": 2, "participation": 0.5}},
        {"spec": "sign", "rounds": 3, "config": {"local_steps": 2, "server_momentum": 0.5}},
        {"spec": "powersgd:rank=2", "rounds": 3, "config": {"local_steps": 2, "min_numel": 0}},
        {"spec": "uniform:bits=4", "rounds": 3, "config": {"transport": "reducescatter"}},
        {"spec": "qsgd", "rounds": 3, "config": {"prox_mu": 0.1, "participation": 0.75}},
        {
            "spec": "topk:ratio=0.1", "rounds": 3,
            "config": {"local_steps": 2, "scaffold": True, "local_lr": 0.05, "participation": 0.5},
        },
    ]  # fmt: skip
    per_rank = run_ranks(rounds, WORLD, cases)
    for c, case in enumerate(cases):
        for r in range(case["rounds"]):
            mine = per_rank[0][c]["params"][r]
            assert torch.isfinite(mine).all(), case
            for other in per_rank[1:]:
                assert torch.equal(mine, other[c]["params"][r]), (case["spec"], r)
        stats = per_rank[0][c]["stats"]
        assert stats.rounds == case["rounds"] and stats.ratio > 1.5, (case["spec"], stats)


def test_one_local_step_lossless_full_participation_is_synchronous_sgd(run_ranks) -> None:
    case = {"spec": "identity", "rounds": 5, "lr": 0.1, "config": {"error_feedback": False}}
    fed = run_ranks(rounds, WORLD, [case])[0][0]["params"][-1]
    ref = run_ranks(dense_sgd, WORLD, 5, 0.1)[0]
    torch.testing.assert_close(fed, ref)


@pytest.mark.parametrize("weighted", [False, True])
def test_partial_participation_averages_the_sampled_clients_with_their_weights(
    run_ranks, weighted: bool
) -> None:
    samples = [10, 30, 20, 40]
    case = {
        "spec": "identity", "rounds": 4, "samples": samples,
        "config": {"participation": 0.5, "error_feedback": False, "weighted": weighted,
                   "local_steps": 2},
    }  # fmt: skip
    res = run_ranks(rounds, WORLD, [case])[0][0]
    w = torch.tensor(samples if weighted else [1] * WORLD, dtype=torch.float64)
    seen = set()
    for r in range(4):
        who = res["participants"][r]
        assert len(who) == 2
        seen.update(who)
        deltas = res["deltas"][r].double()
        expected = res["starts"][r].double() - (w[who, None] * deltas[who]).sum(0) / w[who].sum()
        torch.testing.assert_close(res["params"][r].double(), expected, rtol=1e-5, atol=1e-6)
        # Absent clients trained nothing this round.
        for rank in set(range(WORLD)) - set(who):
            assert not deltas[rank].any()
    assert len(seen) > 2  # the sample changes from round to round


def test_absent_clients_keep_their_error_feedback(run_ranks) -> None:
    case = {"spec": "topk:ratio=0.05", "rounds": 6,
            "config": {"participation": 0.5, "local_steps": 2}}  # fmt: skip
    per_rank = run_ranks(rounds, WORLD, [case])
    checked = 0
    for rank, res in enumerate(r[0] for r in per_rank):
        for r in range(1, 6):
            if rank not in res["participants"][r] and res["residuals"][r - 1]:
                before, after = res["residuals"][r - 1], res["residuals"][r]
                assert before.keys() == after.keys()
                for k in before:
                    assert torch.equal(before[k], after[k]), (rank, r, k)
                checked += 1
            elif rank in res["participants"][r]:
                assert any(v.any() for v in res["residuals"][r].values())
    assert checked > 0


def test_resumed_run_equals_an_uninterrupted_one(run_ranks, tmp_path: pathlib.Path) -> None:
    config = {"participation": 0.5, "local_steps": 2, "scaffold": True, "local_lr": 0.05,
              "server_momentum": 0.5}  # fmt: skip
    base = {"spec": "topk:ratio=0.05", "config": config}
    full = run_ranks(rounds, WORLD, [{**base, "rounds": 6}])
    prefix = str(tmp_path / "ckpt")
    run_ranks(rounds, WORLD, [{**base, "rounds": 3, "save_at": 3, "save": prefix}])
    resumed = run_ranks(rounds, WORLD, [{**base, "first": 3, "rounds": 6, "load": prefix}])
    for a, b in zip(full, resumed):
        assert torch.equal(a[0]["params"][-1], b[0]["params"][-1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"local_steps": 0}, "local_steps"),
        ({"participation": 0.0}, "participation"),
        ({"participation": 1.5}, "participation"),
        ({"server_momentum": 1.0}, "server_momentum"),
        ({"scaffold": True}, "local_lr"),
        ({"prox_mu": -1.0}, "prox_mu"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FedConfig(**kwargs)


def test_config_takes_the_hook_options_as_keywords() -> None:
    cfg = FedConfig(local_steps=3, error_feedback=False, min_numel=0, min_ratio=2.0)
    assert cfg.hook == HookOptions(error_feedback=False, min_numel=0, min_ratio=2.0)
    assert (cfg.error_feedback, cfg.min_numel, cfg.transport) == (False, 0, "auto")
    assert FedConfig(hook=cfg.hook, local_steps=3) == cfg
    assert dataclasses.replace(cfg, seed=5).hook_options() == dataclasses.replace(
        cfg.hook, topology="flat", seed=5
    )
    # Validated where they are declared, naming the field.
    with pytest.raises(ValueError, match="min_numel=-1"):
        FedConfig(min_numel=-1)
    with pytest.raises(ValueError, match="topology: federated exchanges are flat"):
        FedConfig(topology="hierarchical")
    with pytest.raises(ValueError, match="hook: pass a HookOptions or its fields"):
        FedConfig(hook=HookOptions(), min_numel=0)
    with pytest.raises(TypeError, match="local_step"):
        FedConfig(local_step=2)


def test_last_round_stats_are_the_rounds_own_bytes(run_ranks) -> None:
    cases = [
        {"spec": "topk:ratio=0.05", "rounds": 3, "config": {"local_steps": 2}},
        {"spec": "sign", "rounds": 2,
         "config": {"local_steps": 2, "scaffold": True, "local_lr": 0.05}},
    ]  # fmt: skip
    for case in run_ranks(rounds, 2, cases)[0]:
        per_round = case["round_stats"]
        for s in per_round:
            assert s.last_raw_bytes > 0 and s.last_link_bytes > 0
            assert 0 < s.last_wire_bytes < s.last_raw_bytes
            assert s.last_ratio == s.last_raw_bytes / s.last_wire_bytes > 1.5
            assert s.last_compress_s > 0 and s.last_comm_s > 0
        # The rounds' own bytes add up to the cumulative counts.
        final = per_round[-1]
        assert sum(s.last_wire_bytes for s in per_round) == final.wire_bytes
        assert sum(s.last_raw_bytes for s in per_round) == final.raw_bytes
        assert final.uplink_bytes == final.wire_bytes  # every client took part in every round


@pytest.mark.parametrize("samples", [[0, 5], [5, None]])
def test_a_zero_or_missing_sample_count_raises_on_every_rank(run_ranks, samples: list) -> None:
    for message in run_ranks(bad_samples, 2, samples):
        assert message.startswith("num_samples: weighted averaging needs a positive")


@pytest.mark.parametrize("spec", ["topk:ratio=0.1", "identity"])
def test_a_non_finite_round_is_skipped_on_every_rank(run_ranks, spec: str) -> None:
    """Rank 1 ends round 1 with a NaN: every rank keeps the round's starting parameters, the
    server momentum stays finite (also at momentum 0), and later rounds train normally."""
    case = {"spec": spec, "rounds": 4, "nan_round": 1,
            "config": {"server_momentum": 0.0, "min_numel": 0}}  # fmt: skip
    res = [r[0] for r in run_ranks(rounds, 2, [case])]
    for rank in res:
        assert torch.equal(rank["params"][1], rank["starts"][1])
        assert all(torch.isfinite(p).all() for p in rank["params"])
        assert not torch.equal(rank["params"][3], rank["params"][1])  # training went on
        assert rank["stats"].nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(res[0]["params"], res[1]["params"]))


def test_a_client_a_round_behind_raises_on_every_rank_naming_the_rounds(run_ranks) -> None:
    for message in run_ranks(skipped_end_round, 2):
        assert "ranks are at different rounds (rank 0 at round 1, rank 1 at round 2)" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"outer_optimizer": "sgd"}, "outer_optimizer=str: must be a torch optimizer"),
        ({"outer_optimizer": lambda ws: 0}, "outer_optimizer: the factory returned a int"),
        ({"outer_optimizer": torch.optim.SGD, "server_momentum": 0.5}, "outer_optimizer: give"),
    ],
)
def test_a_bad_outer_optimizer_names_the_field(kwargs: dict, match: str) -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=match):
        FederatedAverager(model, "identity", **kwargs)
