"""No host reads of device values during a compressed step (``nonfinite_check="device"``, the
default on CUDA) of every compressor whose payload sizes follow from the config, over the
all-reduce and the all-gather transports, flat and hierarchical, counted on real gloo
processes. Data-dependent sizes (a threshold's count, DGC's, adaptive's bit width, entropy
codes) are exchanged through the host: two reads a step, every rank's sizes and then every
rank's part shapes. The entropy coder itself runs on the host, so it is not counted here."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _host_reads import count_reads, gathered_overflow_rolls_back, overflow_rolls_back

ALL_REDUCIBLE = ["identity", "fp16", "bf16", "randomk", "uniform:shared_scale=true", "powersgd"]
#: over the all-gather transport: the quantizers keep their scalars on the device, and top-k
#: selects by a threshold on the device
GATHERED = ["sign", "topk", "uniform", "qsgd", "ternary", "nonuniform", "topk|uniform:bits=4"]
SPECS = ALL_REDUCIBLE + GATHERED


def test_compressed_steps_read_nothing_back(run_ranks) -> None:
    for rank in run_ranks(count_reads, 2, SPECS, {}):
        for spec in SPECS:
            assert rank[spec]["reads"] == {}, f"{spec}: host reads {rank[spec]['reads']}"
            if spec != "identity":
                assert rank[spec]["ratio"] > 1.5, spec


def test_hierarchical_steps_read_nothing_back(run_ranks) -> None:
    # 2 nodes x 2 ranks: the overflow flag is summed inside the node, then rides across.
    options = {"topology": "hierarchical", "ranks_per_node": 2}
    for rank in run_ranks(count_reads, 4, SPECS, options):
        for spec in SPECS:
            assert rank[spec]["layout"] == "hierarchical:2x2", spec
            assert rank[spec]["reads"] == {}, f"{spec}: host reads {rank[spec]['reads']}"
            if spec != "identity":
                assert rank[spec]["ratio"] > 1.5, spec


def test_the_device_kernels_read_nothing_back(run_ranks) -> None:
    # The Triton kernels (what CUDA tensors run), interpreted on the CPU: their statistics
    # stay tensors, and the casts' and random-k's flags stay on the device.
    specs = ["sign", "uniform", "qsgd", "fp16", "randomk"]
    for rank in run_ranks(count_reads, 2, specs, {}, "triton"):
        for spec in specs:
            assert rank[spec]["reads"] == {}, f"{spec}: host reads {rank[spec]['reads']}"


#: data-dependent sizes: the transport's two reads (sizes, then part shapes), plus at most one
#: per tensor (the test model has three) for what decides the size: DGC's sampled threshold,
#: the count a threshold selects where the torch path selects (``nonzero``), and adaptive's
#: statistics, from which the host picks the bit width (its decoders read none: the codes'
#: size gives the width)
VARIABLE = {"threshold:threshold=2.0": 2 + 3, "dgc": 2 + 3, "adaptive": 2 + 3}


def test_variable_size_steps_read_only_their_sizes(run_ranks) -> None:
    specs = list(VARIABLE)
    hierarchical = {"topology": "hierarchical", "ranks_per_node": 2}
    for world, options in [(2, {}), (4, hierarchical)]:
        for rank in run_ranks(count_reads, world, specs, options):
            for spec, most in VARIABLE.items():
                reads = rank[spec]["reads"]
                assert sum(reads.values()) <= most, f"{spec} on {world} ranks: reads {reads}"
                assert rank[spec]["ratio"] > 1.5, spec


def test_adaptive_on_the_device_kernels_reads_once_per_tensor(run_ranks) -> None:
    # The Triton kernels (what CUDA tensors run), interpreted on the CPU: the encode's
    # finiteness check and statistics come back in one copy, and decoding reads nothing.
    for rank in run_ranks(count_reads, 2, ["adaptive"], {}, "triton"):
        reads = rank["adaptive"]["reads"]
        assert sum(reads.values()) <= VARIABLE["adaptive"], f"adaptive: reads {reads}"
        assert rank["adaptive"]["ratio"] > 1.5


def test_an_overflow_only_the_averages_show_still_rolls_the_step_back(run_ranks) -> None:
    # One rank: with two, the first step's fp16 sum of 4e4 + 4e4 would overflow already.
    for rank in run_ranks(overflow_rolls_back, 1):
        assert rank == {"same": True, "finite": True, "marked": True, "nonfinite_steps": 1}


def test_a_gathered_step_some_rank_overflowed_leaves_every_memory_as_it_was(run_ranks) -> None:
    # Client memories over the all-gather transport, and the reduce-scatter server's.
    for specs, options in [(["sign", "topk"], {}), (["uniform"], {"transport": "reducescatter"})]:
        for rank in run_ranks(gathered_overflow_rolls_back, 2, specs, options):
            for spec in specs:
                expected = {"same": True, "nonfinite_steps": 1, "then_finite": True}
                assert rank[spec] == expected, spec
