"""commhooks.fsdp on real gloo ranks: the reduce-scatter mode on 2 ranks against dense FSDP2,
the hierarchical mode on 4 ranks as 2 nodes x 2 ranks against dense HSDP; every compressor in
both; mixed precision, accumulation, reshard_after_forward, non-finite steps, exact resume
through torch.distributed.checkpoint, refused input.

One launch per world size serves every test (start-up dominates on a small machine).

Tolerance: identity through the custom reduce-scatter (the engine's scatter: each
destination's chunk sent in one all-to-all, summed in fp32 in rank order by its owner) or
the all-reduce hook sums the same fp32 values as FSDP2's own collectives, but gloo's
reduce-scatter and all-reduce may add them in another order; with 2 summands per collective
(2 ranks, or 2 nodes after 2 ranks per node) fp32 addition is commutative, so the runs agree
bit for bit and the tests check equality up to fp32 defaults of assert_close only to stay
valid where the order differs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _fsdp_workers import run_cases
from _spawn import ranks_runner

import commhooks

#: every compressor, and the variants with another wire format
SPECS = [
    *commhooks.available(),
    "uniform:bits=4",
    "topk:ratio=0.05,index_coding=bitmap",
    "powersgd:rank=2",
]
#: transports forced; in the reduce-scatter mode "auto" takes "reducescatter" for these codecs
TRANSPORTS = [
    ("uniform", "reducescatter"),
    ("uniform", "allgather"),
    ("topk", "reducescatter"),
    ("sign", "allreduce"),
]
#: FSDP units of the test model (its three Linear layers; the root holds no parameters)
UNITS = 3
#: bytes of the test model's 2-D weights in fp32 (what error feedback compresses)
WEIGHT_BYTES = 4 * (16 * 64 + 64 * 64 + 64 * 8)
#: compress every 2-D tensor, whatever its size, so every codec is exercised
OPTS = {"min_numel": 0, "min_ratio": 0.0}
STEPS = 3


def _cases(mesh: str, world: int, tmp: Any) -> dict[str, list[dict[str, Any]]]:
    dense = {"mesh": "flat" if mesh == "flat" else "hsdp"}
    ours = {"mesh": mesh, "opts": OPTS}
    groups: dict[str, list[dict[str, Any]]] = {
        "dense": [dense],
        "identity": [{**ours, "spec": "identity"}],
        "specs": [{**ours, "spec": s, "steps": 2} for s in SPECS],
        "transports": [
            {**ours, "spec": s, "steps": 2, "opts": {**OPTS, "transport": t}} for s, t in TRANSPORTS
        ],
        "resume": [
            {**ours, "spec": s, "resume": 2, "path": str(tmp / f"{mesh}-{i}")}
            for i, s in enumerate(("uniform:bits=4", "topk:ratio=0.1"))
        ],
        "nan": [{**ours, "spec": "uniform:bits=4", "nan_at": (1, world - 1, 0)}],
        "micro_dense": [{**dense, "micro": 2}],
        "micro": [
            {**ours, "spec": "identity", "micro": 2},
            {**ours, "spec": "uniform", "micro": 2},
        ],
        "mp_dense": [{**dense, "mp": True}],
        "mp": [{**ours, "spec": "identity", "mp": True}, {**ours, "spec": "uniform", "mp": True}],
        "reshard_dense": [{**dense, "reshard": False}],
        "reshard": [{**ours, "spec": "identity", "reshard": False}],
    }
    if mesh == "flat":
        groups["bad"] = [
            {"bad": b} for b in ("unsharded", "divide", "groups", "coalesce", "hsdp")
        ] + [{"bad": "mesh", "saved": "hierarchical:2x2"}, {"bad": "scatter_size"}]
    else:
        groups["bad"] = [{"bad": "flat_on_node"}, {"bad": "other_mesh", "path": str(tmp / "other")}]
    return groups


def _launch(tmp: Any, mesh: str, world: int) -> dict[str, list[list[dict[str, Any]]]]:
    """Run every group of cases in one launch; per group, per case, the ranks' results."""
    groups = _cases(mesh, world, tmp)
    flat = [c for cs in groups.values() for c in cs]
    by_rank = ranks_runner(tmp)(run_cases, world, flat)
    out, pos = {}, 0
    for name, cs in groups.items():
        out[name] = [[by_rank[r][pos + i] for r in range(world)] for i in range(len(cs))]
        pos += len(cs)
    return out


@pytest.fixture(scope="module")
def flat(tmp_path_factory: Any) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("flat"), "flat", 2)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: Any) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("nodes"), "node", 4)


@pytest.fixture(params=["flat", "nodes"])
def runs(request: Any) -> dict[str, Any]:
    return request.getfixturevalue(request.param)


def assert_same_run(a: dict[str, Any], b: dict[str, Any], label: str, **tol: float) -> None:
    """Same gradients and parameters after every step."""
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"], strict=True)):
        for name in ga:
            torch.testing.assert_close(
                gb[name], ga[name], msg=f"{label}: grad {name} at {step}", **tol
            )
    for step, (pa, pb) in enumerate(zip(a["params"], b["params"], strict=True)):
        for name in pa:
            torch.testing.assert_close(pb[name], pa[name], msg=f"{label}: {name} at {step}", **tol)


def assert_replicas(ranks: list[dict[str, Any]], label: str) -> None:
    """Every rank (every node) ends each step with the same full parameters."""
    for r, res in enumerate(ranks[1:], start=1):
        assert_same_run(ranks[0], res, f"{label}, rank {r} against rank 0", rtol=0, atol=0)


def test_identity_equals_dense(runs: dict[str, Any]) -> None:
    (dense,) = runs["dense"]
    (ident,) = runs["identity"]
    for r in range(len(dense)):
        assert_same_run(dense[r], ident[r], f"identity, rank {r}")
    stats = ident[0]["stats"]
    assert stats.steps == STEPS and stats.raw_bytes > 0


@pytest.mark.parametrize("i", range(len(SPECS)), ids=SPECS)
def test_every_compressor_compresses(runs: dict[str, Any], i: int) -> None:
    ranks = runs["specs"][i]
    spec = SPECS[i]
    assert_replicas(ranks, spec)
    (dense,) = runs["dense"]
    for name, p in ranks[0]["params"][-1].items():
        # Two SGD steps from the same start stay near dense (catches a wrong sum or scale).
        assert (p - dense[0]["params"][1][name]).abs().max() < 0.05, (spec, name)
    stats = ranks[0]["stats"]
    assert stats.steps == 2, spec
    if spec != "identity":
        assert stats.wire_bytes < stats.raw_bytes, (spec, stats)


@pytest.mark.parametrize("i", range(len(TRANSPORTS)), ids=[f"{s}-{t}" for s, t in TRANSPORTS])
def test_explicit_transports(runs: dict[str, Any], i: int) -> None:
    spec, transport = TRANSPORTS[i]
    ranks = runs["transports"][i]
    if isinstance(ranks[0], str):  # refused: sign does not sum
        assert transport == "allreduce" and "not summable" in ranks[0], ranks[0]
        return
    assert_replicas(ranks, f"{spec} over {transport}")
    (dense,) = runs["dense"]
    for name, p in ranks[0]["params"][-1].items():
        assert (p - dense[0]["params"][1][name]).abs().max() < 0.05, (spec, transport, name)
    stats = ranks[0]["stats"]
    assert stats.wire_bytes < stats.raw_bytes


def test_exact_resume(runs: dict[str, Any]) -> None:
    for ranks in runs["resume"]:
        for r, res in enumerate(ranks):
            assert_same_run(res["straight"], res["resumed"], f"resume rank {r}", rtol=0, atol=0)
            assert res["straight"]["ef"][-1] > 0  # error feedback was saved and restored


def test_nonfinite_step_skipped_alike(runs: dict[str, Any]) -> None:
    (ranks,) = runs["nan"]
    for r, res in enumerate(ranks):
        assert res["skipped"] == [False, True, False], f"rank {r}"
        assert res["stats"].nonfinite_steps == 1
        # Nothing committed on the skipped step: the residuals are as the step before left them.
        assert res["ef"][1] == res["ef"][0], f"rank {r}"
        assert res["ef"][2] != res["ef"][1]


def test_accumulation_exchanges_once(runs: dict[str, Any]) -> None:
    (dense,) = runs["micro_dense"]
    ident, quant = runs["micro"]
    for r in range(len(dense)):
        assert_same_run(dense[r], ident[r], f"accumulated identity, rank {r}")
    one = runs["identity"][0][0]["stats"]
    for res in (ident[0], quant[0]):
        # One exchange per optimizer step, of the same size as without accumulation.
        assert res["stats"].steps == STEPS
        assert res["stats"].last_raw_bytes == one.last_raw_bytes
    assert quant[0]["stats"].wire_bytes < quant[0]["stats"].raw_bytes


def test_mixed_precision(runs: dict[str, Any]) -> None:
    (dense,) = runs["mp_dense"]
    ident, quant = runs["mp"]
    for r in range(len(dense)):
        assert_same_run(dense[r], ident[r], f"bf16 params, fp32 reduce, rank {r}")
    assert_replicas(quant, "uniform under mixed precision")
    stats = quant[0]["stats"]
    assert stats.wire_bytes < stats.raw_bytes
    # reduce_dtype=fp32: the exchange was handed fp32 gradients (4 bytes per element)
    assert stats.last_raw_bytes == runs["identity"][0][0]["stats"].last_raw_bytes


def test_reshard_after_forward_false(runs: dict[str, Any]) -> None:
    (dense,) = runs["reshard_dense"]
    (ident,) = runs["reshard"]
    for r in range(len(dense)):
        assert_same_run(dense[r], ident[r], f"reshard_after_forward=False, rank {r}")


def test_bad_input_flat(flat: dict[str, Any]) -> None:
    messages = [ranks[0] for ranks in flat["bad"]]
    for ranks in flat["bad"]:
        assert len(set(ranks)) == 1  # every rank raised alike
    unsharded, divide, groups, coalesce, hsdp, mesh, scatter_size = messages
    assert "not fully_shard-ed" in unsharded
    assert "gradient_divide_factor=3.0" in divide
    assert "2 FSDP parameter groups" in groups and "'<root>'" in groups
    assert "coalesce" in coalesce
    assert "2-D mesh" in hsdp
    assert "'hierarchical:2x2'" in mesh and "'reducescatter:2'" in mesh
    assert "tensors: 'odd' has 3 elements" in scatter_size


def test_bad_input_nodes(nodes: dict[str, Any]) -> None:
    flat_on_node, mesh = [ranks[0] for ranks in nodes["bad"]]
    assert "topology='flat'" in flat_on_node and "2 of 4 ranks" in flat_on_node
    assert "'reducescatter:4'" in mesh and "'hierarchical:2x2'" in mesh


def test_hierarchical_feedback_is_a_shard(nodes: dict[str, Any], flat: dict[str, Any]) -> None:
    """Error feedback per rank holds this rank's shard: half of what the reduce-scatter mode
    keeps for the same model and codec (its residual is the unsharded gradient)."""
    i = SPECS.index("topk")
    hier = nodes["specs"][i][0]["feedback_bytes"]
    whole = flat["specs"][i][0]["feedback_bytes"]
    assert hier > 0 and hier * 2 <= whole


#: codecs the reduce-scatter mode sends through the scatter (static size, one round)
SCATTERED = ["identity", "bf16", "uniform", "uniform:bits=4", "topk", "sign", "qsgd"]


@pytest.mark.parametrize("spec", SCATTERED)
def test_scatter_sends_each_chunk_once(flat: dict[str, Any], spec: str) -> None:
    """The reduce-scatter mode's "auto": per unit and step, the overflow flag's all-reduce
    (with the small tensors) and one all-to-all of the compressed chunks; no all-gather, no
    second compression. Each rank's link carries half its payload on 2 ranks."""
    ranks = flat["specs"][SPECS.index(spec)]
    assert ranks[0]["transport"] == "reducescatter", spec
    stats = ranks[0]["stats"]
    assert stats.collectives == 2 * UNITS * stats.steps, (spec, stats)
    if spec not in ("identity", "bf16"):
        assert stats.link_bytes < stats.wire_bytes < stats.raw_bytes / 2, (spec, stats)


def test_scatter_feedback_is_client_side(flat: dict[str, Any]) -> None:
    """Error feedback through the scatter holds each compressed weight's whole gradient
    (fp32) on every rank, and nothing on a server side."""
    for spec in ("uniform", "topk", "sign"):
        assert flat["specs"][SPECS.index(spec)][0]["feedback_bytes"] == WEIGHT_BYTES, spec
