"""The DDP hook with topology="hierarchical" on 4 real gloo ranks as 2 nodes x 2 ranks:
against flat dense averaging, replicas for every compressor, exact resume, refused topology.

Two launches of 4 ranks serve every test (their start-up dominates on a small machine)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch
from _spawn import ranks_runner
from _workers import run_cases
from test_hooks import OPTS, SPECS, assert_replicas_identical, per_case

HIER = {**OPTS, "topology": "hierarchical", "ranks_per_node": 2}
FLAT_IDENTITY = ("ours", "identity", {**OPTS, "topology": "flat"})
#: the inner transports beyond "auto" that the hierarchical topology can carry
INNER = [("uniform", "reducescatter"), ("identity", "allgather")]
#: every tensor compressed: a dense all-reduce over 4 ranks sums in an order that depends on
#: DDP's buckets, which a fresh DDP builds differently on its first step
EVERY = {"min_numel": 0, "compress_1d": True}
CHECKPOINTED = [("topk", "auto"), ("powersgd", "auto"), ("uniform", "reducescatter")]
K = 3  # steps before and after the checkpoint


def hier(spec: str, **options: Any) -> tuple[str, str, dict[str, Any]]:
    return ("ours", spec, {**HIER, **options})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("hier")
    run = ranks_runner(tmp)
    every = [(s, "auto") for s in SPECS] + INNER
    identity = [{"hook": FLAT_IDENTITY, "keep_grads": True},
                {"hook": hier("identity"), "keep_grads": True}]  # fmt: skip
    compressors = [
        {"hook": hier(s, transport=t), "steps": 3, "bucket_cap_mb": 0.005} for s, t in every
    ]
    whole, first, second = [], [], []
    for i, (spec, transport) in enumerate(CHECKPOINTED):
        path = str(tmp / f"ckpt{i}-{{rank}}.pt")
        hook = hier(spec, transport=transport, **EVERY)
        whole.append({"hook": hook, "steps": 2 * K})
        first.append({"hook": hook, "steps": K, "save": path})
        second.append({"hook": hook, "steps": K, "first_step": K, "load": path})
    # A flat job refuses the hierarchical job's checkpoint.
    refused = {"hook": FLAT_IDENTITY, "load": str(tmp / "ckpt0-{rank}.pt"), "may_fail": True}
    a = per_case(run(run_cases, 4, identity + compressors + whole + first))
    b = per_case(run(run_cases, 4, [*second, refused]))
    n, m = len(identity), len(compressors)
    return {
        "identity": a[:n],
        "every": list(zip(every, a[n : n + m], strict=True)),
        "whole": a[n + m : n + m + len(whole)],
        "resumed": b[: len(second)],
        "refused": b[-1],
    }


def test_identity_equals_flat_dense_averaging(runs: dict[str, Any]) -> None:
    a, b = runs["identity"]
    for rank in range(4):
        for step, (x, y) in enumerate(zip(a[rank]["grads"], b[rank]["grads"], strict=True)):
            for g, h in zip(x, y, strict=True):
                torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        for p, q in zip(a[rank]["final"], b[rank]["final"], strict=True):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert_replicas_identical(b, "identity hierarchical")
    assert b[0]["stats"].node_bytes > 0 and a[0]["stats"].node_bytes == 0


def test_every_compressor_keeps_replicas_identical(runs: dict[str, Any]) -> None:
    for (spec, transport), res in runs["every"]:
        label = f"{spec} over {transport}, hierarchical"
        assert_replicas_identical(res, label)
        assert all(res[0]["finite"]), label
        assert res[0]["stats"].steps == 3 and res[0]["stats"].node_bytes > 0, label
        # Error feedback is keyed per node piece: "<name>/<local rank>".
        for r in range(4):
            assert all(k.endswith(f"/{r % 2}") for k in res[r]["ef_keys"]), label


def test_checkpoint_resume_is_bit_exact(runs: dict[str, Any]) -> None:
    for (spec, transport), a, b in zip(CHECKPOINTED, runs["whole"], runs["resumed"], strict=True):
        for rank in range(4):
            assert a[rank]["params"][K:] == b[rank]["params"], f"{spec} over {transport}"
            assert a[rank]["ef"][K:] == b[rank]["ef"], f"{spec} over {transport}"


def test_another_topology_is_refused(runs: dict[str, Any]) -> None:
    for res in runs["refused"]:
        err = res["error"]
        assert "topology 'hierarchical:2x2'" in err and "'flat'" in err, err


def test_torchrun_two_nodes_found_from_local_world_size(tmp_path) -> None:
    """Two torchrun invocations on this machine, as node 0 and node 1 of 2 ranks each."""
    script = pathlib.Path(__file__).with_name("_torchrun_nodes.py")
    port = str(random.randint(20000, 59999))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                str(script),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("torchrun still running after 300 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r in ranks:
        assert r["local_world_size"] == "2"
        assert r["layouts"] == ["flat", "hierarchical:2x2", "hierarchical:2x2"]
        assert r["identity_vs_flat"] < 1e-5
    assert len({r["topk_params"] for r in ranks}) == 1
