"""No host reads of device values during a compressed step of the all-reducible compressors
(``nonfinite_check="device"``, the default on CUDA), counted on real gloo processes."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _host_reads import count_reads, overflow_rolls_back

ALL_REDUCIBLE = ["identity", "fp16", "bf16", "randomk", "uniform:shared_scale=true", "powersgd"]


def test_compressed_steps_read_nothing_back(run_ranks) -> None:
    for rank in run_ranks(count_reads, 2, ALL_REDUCIBLE, {}):
        for spec in ALL_REDUCIBLE:
            assert rank[spec]["reads"] == {}, f"{spec}: host reads {rank[spec]['reads']}"
            if spec != "identity":
                assert rank[spec]["ratio"] > 1.5, spec


def test_hierarchical_steps_read_nothing_back(run_ranks) -> None:
    # 2 nodes x 2 ranks: the overflow flag is summed inside the node, then rides across.
    options = {"topology": "hierarchical", "ranks_per_node": 2}
    for rank in run_ranks(count_reads, 4, ALL_REDUCIBLE, options):
        for spec in ALL_REDUCIBLE:
            assert rank[spec]["layout"] == "hierarchical:2x2", spec
            assert rank[spec]["reads"] == {}, f"{spec}: host reads {rank[spec]['reads']}"
            if spec != "identity":
                assert rank[spec]["ratio"] > 1.5, spec


def test_an_overflow_only_the_averages_show_still_rolls_the_step_back(run_ranks) -> None:
    # One rank: with two, the first step's fp16 sum of 4e4 + 4e4 would overflow already.
    for rank in run_ranks(overflow_rolls_back, 1):
        assert rank == {"same": True, "finite": True, "marked": True, "nonfinite_steps": 1}
