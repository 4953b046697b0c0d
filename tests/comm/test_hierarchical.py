"""The hierarchical transport on 4 real gloo ranks, as 2 nodes x 2 ranks: its average against
a flat dense all-reduce, explicit groups, and how it refuses what it cannot serve."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

from commhooks.comm.collectives import TorchCollectives
from commhooks.comm.hierarchical import (
    HierarchicalTransport,
    _scatter_layout,
    local_from_env,
    node_groups,
    node_ranks,
)
from commhooks.comm.transport import AllGatherTransport, ReduceScatterTransport
from commhooks.engine.state import HookOptions
from commhooks.registry import compressor
from tests._spawn import init

#: matrices whose rows split by node (PowerSGD's path), odd sizes that need padding, fp16
SHAPES = [((6, 5), torch.float32), ((7,), torch.float32), ((3, 3), torch.float32),
          ((1,), torch.float32), ((4, 4), torch.float16)]  # fmt: skip


def _grads(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(s, generator=g).to(d) for s, d in SHAPES]


def _errors(fn: Any) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, world: int, store: str, out: str) -> None:
    init(rank, world, store)
    comm = TorchCollectives()
    res: dict[str, Any] = {}
    grads = _grads(rank)
    res["dense"] = [t.float().clone() for t in grads]
    for t in res["dense"]:
        dist.all_reduce(t)
        t.div_(world)
    keys = [f"p{i}" for i in range(len(grads))]
    nodes = node_groups("hierarchical", comm, ranks_per_node=2)
    assert nodes is not None
    res["layout"] = nodes.layout
    identity = compressor("identity")
    for inner in (None, AllGatherTransport, ReduceScatterTransport):
        t = HierarchicalTransport(identity, None, comm, local=nodes.local, cross=nodes.cross,
                                  inner=inner)  # fmt: skip
        means, stats = t.run(keys, [g.clone() for g in grads])
        res[f"identity/{t.inner.name}"] = (means, stats)
    # The same groups, made by hand and given explicitly (process groups, not collectives).
    local = dist.new_group([0, 1] if rank < 2 else [2, 3], use_local_synchronization=True)
    cross = dist.new_group([0, 2] if rank % 2 == 0 else [1, 3], use_local_synchronization=True)
    given = node_groups("auto", comm, groups=(local, cross))
    assert given is not None
    t = HierarchicalTransport(identity, None, comm, local=given.local, cross=given.cross)
    res["explicit"] = t.run(keys, [g.clone() for g in grads])[0]
    res["auto one node"] = node_groups("auto", comm, ranks_per_node=4)
    res["auto 2x2"] = getattr(node_groups("auto", comm, ranks_per_node=2), "layout", None)
    res["no launcher"] = _errors(lambda: node_groups("hierarchical", comm))
    res["not a multiple"] = _errors(lambda: node_groups("hierarchical", comm, ranks_per_node=3))
    res["bad groups"] = _errors(lambda: node_groups("auto", comm, groups=(local, None)))
    res["negative"] = _errors(lambda: node_groups("auto", comm, ranks_per_node=-1))
    # A backend's own launcher and group builder (as the Horovod optimizer passes them).
    res["built"] = node_groups(
        "auto", comm, launcher=(2, rank % 2, "hvd.local_size()"), build=lambda c, n: n
    )
    res["built misplaced"] = node_groups(
        "auto", comm, launcher=(2, rank // 2, "hvd.local_size()"), build=lambda c, n: n
    )
    # torchrun's variables, with ranks not numbered node by node: refused on every rank.
    os.environ.update(LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank // 2))
    res["placement auto"] = node_groups("auto", comm)
    res["placement"] = _errors(lambda: node_groups("hierarchical", comm))
    os.environ.update(LOCAL_RANK=str(rank % 2))
    res["from env"] = getattr(node_groups("auto", comm), "layout", None)
    torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: Any) -> list[dict[str, Any]]:
    from tests._spawn import ranks_runner

    return ranks_runner(tmp_path_factory.mktemp("hier"))(_worker, 4)


def test_identity_equals_flat_dense_averaging(ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(ranks):
        assert res["layout"] == "hierarchical:2x2"
        for label in ("identity/allreduce", "identity/allgather", "identity/reducescatter"):
            means, stats = res[label]
            for got, want, (shape, dtype) in zip(means, res["dense"], SHAPES, strict=True):
                assert got.shape == shape and got.dtype == dtype, label
                tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float16 else {}
                torch.testing.assert_close(got.float(), want, **tol, msg=f"{label} rank {r}")
            assert stats.node_bytes > 0 and stats.wire_bytes > 0, label
        for got, want in zip(res["explicit"], res["identity/allreduce"][0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for res in ranks[1:]:  # replicas: bit for bit
        for got, want in zip(res["identity/allgather"][0], ranks[0]["identity/allgather"][0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inter_node_bytes_are_a_piece(ranks: list[dict[str, Any]]) -> None:
    """Each rank sends only its half of the identity payload between the 2 nodes."""
    _, stats = ranks[0]["identity/allgather"]
    raw = sum(torch.Size(s).numel() * (2 if d == torch.float16 else 4) for s, d in SHAPES)
    assert stats.wire_bytes < 0.75 * raw


def test_groups_are_resolved_or_refused(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        assert res["auto one node"] is None
        assert res["auto 2x2"] == "hierarchical:2x2"
        assert res["from env"] == "hierarchical:2x2"
        assert "ValueError" in res["no launcher"] and "LOCAL_WORLD_SIZE" in res["no launcher"]
        assert "ranks_per_node=3" in res["not a multiple"]
        assert "node_groups" in res["bad groups"]
        assert res["placement auto"] is None  # flat, as before the option existed
        assert "RuntimeError" in res["placement"] and "node by node" in res["placement"]
        assert "rank 1 has local rank 0 of 2" in res["placement"]
        assert res["built"] == 2 and res["built misplaced"] is None
        assert "ValueError" in res["negative"] and "ranks_per_node=-1" in res["negative"]


def test_node_ranks_lists_nodes_then_cross_groups() -> None:
    assert node_ranks(4, 2) == [[0, 1], [2, 3], [0, 2], [1, 3]]
    assert node_ranks(6, 3) == [[0, 1, 2], [3, 4, 5], [0, 3], [1, 4], [2, 5]]
    world, size = 12, 4
    layout = node_ranks(world, size)
    for rank in range(world):
        assert rank in layout[rank // size] and rank in layout[world // size + rank % size]


def test_options_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="topology='ring'"):
        HookOptions(topology="ring")
    with pytest.raises(ValueError, match="ranks_per_node=-1"):
        HookOptions(ranks_per_node=-1)


def test_launcher_environment() -> None:
    assert local_from_env({}) is None
    assert local_from_env({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "3"}) == (
        4,
        3,
        "LOCAL_WORLD_SIZE",
    )
    mpi = {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert local_from_env(mpi) == (2, 1, "OMPI_COMM_WORLD_LOCAL_SIZE")
    with pytest.raises(ValueError, match="LOCAL_RANK=4"):
        local_from_env({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "4"})


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_scatter_layout_cuts_equal_zero_padded_pieces(size: int) -> None:
    tensors = [torch.randn(6, 5), torch.randn(7), torch.randn(1), torch.randn(3, 3)]
    send, widths = _scatter_layout(tensors, size)
    assert send.shape == (size, sum(widths))
    for t, cols in zip(tensors, send.split(widths, dim=1), strict=True):
        flat = cols.reshape(-1)
        torch.testing.assert_close(flat[: t.numel()], t.reshape(-1), rtol=0, atol=0)
        assert not flat[t.numel() :].any()
