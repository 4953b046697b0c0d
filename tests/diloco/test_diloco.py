"""DiLoCo on real gloo ranks: the equivalences (parameter averaging, written-out DiLoCo,
FederatedAverager), fragments, bit-exact resume, 2 replicas x 2 DDP ranks, non-finite
syncs, bad values, disagreeing ranks and ranks at different rounds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _diloco_workers import BAD, NESTEROV, cases, layout_2x2
from _spawn import ranks_runner

from commhooks.diloco import DiLoCoConfig, split_fragments

SGD1 = ("SGD", {"lr": 1.0})
PLAIN = {"diloco": {"sync_every": 3}, "outer": NESTEROV, "steps": 9}
COMPRESSED = {"compressor": "topk:ratio=0.2", "min_numel": 0}
RESUMED = {
    "diloco": {"sync_every": 4, "fragments": 2, "delay": 1, "mix": 0.25, **COMPRESSED},
    "outer": NESTEROV, "adamw": True, "steps": 11,
}  # fmt: skip
SAVE_AT = 5  # fragment 0 (sent at inner step 4k + 1, applied at 4k + 2) is in flight


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("diloco")
    run = ranks_runner(tmp)
    ckpt = str(tmp / "ckpt{rank}.pt")
    todo = {
        "h1": {"diloco": {"sync_every": 1}, "outer": SGD1, "steps": 4},
        "h1 ref": {"kind": "averaging", "steps": 4},
        "plain": PLAIN,
        "plain ref": {**PLAIN, "kind": "reference"},
        "one fragment": {**PLAIN, "diloco": {"sync_every": 3, "fragments": 1, "delay": 0}},
        "federated": {**PLAIN, "kind": "federated"},
        "streaming": {**PLAIN, "diloco": {"sync_every": 6, "fragments": 3}, "steps": 12},
        "whole": {**RESUMED, "save_at": SAVE_AT, "save": ckpt},
        "nan": {"diloco": {"sync_every": 2, **COMPRESSED}, "outer": SGD1, "steps": 6,
                "nan_step": 3},
        # rank 0 applies a fragment at step 1, rank 1 not before step 2
        "faults": {"kind": "faults", "disagree": {
            "common": {"sync_every": 2}, "ranks": [{"fragments": 2}, {"fragments": 1}]}},
    }  # fmt: skip
    first = run(cases, 2, list(todo.values()))
    resumed = run(cases, 2, [{**RESUMED, "first": SAVE_AT, "load": ckpt}])
    out = {name: [r[i] for r in first] for i, name in enumerate(todo)}
    out["resumed"] = [r[0] for r in resumed]
    return out


def test_one_step_rounds_with_plain_outer_sgd_are_parameter_averaging(runs) -> None:
    for rank in range(2):
        torch.testing.assert_close(runs["h1"][rank]["params"][-1], runs["h1 ref"][rank])


def test_rounds_equal_diloco_written_out_with_a_dense_all_reduce(runs) -> None:
    for rank in range(2):
        torch.testing.assert_close(runs["plain"][rank]["params"][-1], runs["plain ref"][rank])
        # Replicas agree after each sync (steps 3, 6, 9) and differ in between.
        params = [runs["plain"][r]["params"] for r in range(2)]
    for step in range(9):
        same = torch.equal(params[0][step], params[1][step])
        assert same == (step % 3 == 2), step


def test_one_fragment_equals_plain_diloco(runs) -> None:
    for rank in range(2):
        assert torch.equal(
            runs["one fragment"][rank]["params"][-1], runs["plain"][rank]["params"][-1]
        )


def test_full_participation_federated_rounds_with_the_outer_optimizer_are_diloco(runs) -> None:
    for rank in range(2):
        torch.testing.assert_close(runs["federated"][rank], runs["plain"][rank]["params"][-1])


def test_fragments_sync_in_turn_with_a_fraction_of_the_bytes(runs) -> None:
    stream, plain = runs["streaming"][0]["stats"], runs["plain"][0]["stats"]
    # 12 steps, 3 fragments each applied every 6 steps (at steps 2, 4, 6 of each round)
    assert [f.syncs for f in stream.fragments] == [2, 2, 2]
    assert stream.syncs == 6 and stream.inner_steps == 12
    assert stream.peak_wire_bytes < 0.5 * plain.peak_wire_bytes
    assert sum(f.wire_bytes for f in stream.fragments) == stream.wire_bytes
    # Every replica holds the same global weights.
    assert torch.equal(runs["streaming"][0]["global"], runs["streaming"][1]["global"])


def test_resume_with_a_fragment_in_flight_is_bit_exact(runs) -> None:
    for rank in range(2):
        whole, resumed = runs["whole"][rank], runs["resumed"][rank]
        assert torch.equal(whole["params"][-1], resumed["params"][-1]), rank
        assert torch.equal(whole["global"], resumed["global"]), rank
        s = whole["stats"]
        assert (s.syncs, s.wire_bytes) == (resumed["stats"].syncs, resumed["stats"].wire_bytes)
        assert 0 < s.wire_bytes < s.raw_bytes  # compression happened


def test_a_non_finite_pseudo_gradient_skips_the_sync_on_every_replica(runs) -> None:
    """Rank 1 puts a NaN in its weights before the sync at step 4: every replica goes back
    to the unchanged global weights, error feedback is untouched, and training goes on."""
    res = runs["nan"]
    for rank in range(2):
        r = res[rank]
        assert r["stats"].nonfinite_steps == 1 and r["stats"].syncs == 3
        assert r["residuals_before"].keys() == r["residuals_after"].keys()
        assert r["residuals_before"]
        for k, before in r["residuals_before"].items():
            assert torch.equal(before, r["residuals_after"][k]), k
        assert torch.equal(r["params"][3], r["params"][1])  # back to the last sync's weights
        assert all(torch.isfinite(p).all() for p in r["params"])
        assert not torch.equal(r["params"][5], r["params"][3])  # training went on
        assert 0 < r["stats"].wire_bytes < r["stats"].raw_bytes
    assert torch.equal(res[0]["params"][-1], res[1]["params"][-1])


def test_two_replicas_of_two_ddp_ranks(tmp_path: Any) -> None:
    """DDP inside each replica, DiLoCo across: equal to one rank per replica that trains on
    both DDP ranks' batches, and every rank ends with the same weights."""
    per_rank = ranks_runner(tmp_path)(layout_2x2, 4, [None, "uniform:bits=4"])
    for rank in (0, 2):
        torch.testing.assert_close(per_rank[rank][0]["params"], per_rank[rank][0]["reference"])
    for case in range(2):
        res = [r[case] for r in per_rank]
        assert all(torch.equal(res[0]["params"], r["params"]) for r in res[1:]), case
        assert res[0]["stats"].syncs == 2
    s = per_rank[0][1]["stats"]
    assert 0 < 3 * s.wire_bytes < s.raw_bytes


@pytest.fixture(scope="module")
def fault_runs(runs) -> list[dict[str, Any]]:
    return runs["faults"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_raise_naming_the_field_on_every_rank(fault_runs, case: str) -> None:
    field = case.split()[0]
    for res in fault_runs:
        assert res[case] is not None and res[case].startswith(field), res[case]


def test_ranks_that_disagree_on_an_option_raise_on_every_rank(fault_runs) -> None:
    for res in fault_runs:
        assert res["disagree"] is not None and "ranks disagree" in res["disagree"]


def test_ranks_at_different_rounds_raise_on_every_rank_naming_them(fault_runs) -> None:
    for res in fault_runs:
        assert res["rounds"] is not None
        assert "rank 0 at round 2, rank 1 at round 1" in res["rounds"], res["rounds"]


def test_a_checkpoint_of_other_options_is_refused(fault_runs) -> None:
    for res in fault_runs:
        assert res["other options"].startswith("state: saved by a DiLoCo with"), res


def test_fragments_stride_over_alike_layers_and_balance_bytes() -> None:
    assert split_fragments([10, 1, 10, 1, 10, 1, 10, 1], 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert split_fragments([5] * 6, 3) == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="fragments=4: more fragments than the model's 3"):
        split_fragments([1, 2, 3], 4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mix": 1.0}, "mix"), ({"topology": "ring"}, "topology"), ({"fragments": 0}, "fragments"),
     ({"sync_every": 10, "fragments": 4, "delay": 2}, "delay")],
)  # fmt: skip
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        DiLoCoConfig(**kwargs)
