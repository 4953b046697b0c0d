"""The fused error-feedback paths against the op-by-op reference on both sides of the
reduce-scatter transport (the clients' memories and the server's, which re-compresses each
rank's averaged piece), flat on 2 gloo ranks and as the transport between nodes of the
hierarchical one on 4 (2 nodes x 2 ranks): averages and every memory bit for bit, across
normal steps and a step some rank's NaN rolls back."""

from __future__ import annotations

from tests.comm._fused_memories import compare

#: compressors the reduce-scatter transport carries, with fused paths of each kind (the
#: quantizers' kernels, the casts', the sparsifiers' selection)
SPECS = ["sign", "uniform", "fp16", "topk"]


def test_reduce_scatter_memories_match_the_reference(run_ranks) -> None:
    for rank in run_ranks(compare, 2, SPECS, {"transport": "reducescatter"}):
        for spec in SPECS:
            assert rank[spec]["memories"] == 2, spec  # client and server
            assert all(rank[spec]["same"]), f"{spec}: {rank[spec]['same']}"


def test_hierarchical_memories_match_the_reference(run_ranks) -> None:
    options = {"topology": "hierarchical", "ranks_per_node": 2, "transport": "reducescatter"}
    for rank in run_ranks(compare, 4, SPECS, options):
        for spec in SPECS:
            assert rank[spec]["layout"] == "hierarchical:2x2", spec
            assert rank[spec]["memories"] == 2, spec
            assert all(rank[spec]["same"]), f"{spec}: {rank[spec]['same']}"
