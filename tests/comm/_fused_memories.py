"""Worker: a fused and an op-by-op run of the same steps through the reduce-scatter and the
hierarchical transports, every memory compared (spawned by test_fused_memories.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from commhooks.engine import CompressionState, average_flat
from tests._spawn import init

#: large enough that each rank's piece (half a tensor) takes the native kernels
SHAPES = [torch.Size((256, 256)), torch.Size((64, 32)), torch.Size((128,))]


def _state(spec: str, options: dict[str, Any], fused: bool) -> CompressionState:
    named = [(f"p{i}", torch.nn.Parameter(torch.zeros(s))) for i, s in enumerate(SHAPES)]
    state = CompressionState(
        spec, named_parameters=named, nonfinite_check="host", error_feedback=True, **options
    )
    assert state.feedback is not None
    state.feedback.fused = fused  # the reduce-scatter server's memory follows it
    assert state.transport is not None  # built now, with that server memory
    assert all(m.fused is fused for m in state.memories())
    return state


def compare(
    rank: int, world: int, store: str, out: str, specs: list[str], options: dict[str, Any]
) -> None:
    """Per spec: whether the averages and every memory (client and server side) of the two
    runs agree bit for bit after each step, and how many memories there were. The steps:
    normal ones, then one where rank 0 has a NaN (skipped, rolled back), then normal again."""
    init(rank, world, store)
    try:
        keys = [f"p{i}" for i in range(len(SHAPES))]
        n = sum(s.numel() for s in SHAPES)
        result: dict[str, Any] = {}
        for spec in specs:
            runs = {f: _state(spec, options, f) for f in (True, False)}
            same, memories = [], len(runs[True].memories())
            for step in range(5):
                g = torch.randn(n, generator=torch.Generator().manual_seed(100 * step + rank))
                if step == 3 and rank == 0:
                    g[5] = float("nan")
                outs = {}
                for f, state in runs.items():
                    outs[f] = g.clone()
                    s = state.begin()
                    average_flat(s, outs[f], keys, SHAPES)
                    s.close()
                ok = torch.equal(outs[True], outs[False]) or step == 3
                for a, b in zip(runs[True].memories(), runs[False].memories()):
                    ra, rb = a.state_dict()["residuals"], b.state_dict()["residuals"]
                    ok = ok and ra.keys() == rb.keys()
                    ok = ok and all(torch.equal(ra[k], rb[k]) for k in ra)
                same.append(ok)
            result[spec] = {"same": same, "memories": memories, "layout": runs[True].layout}
        torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
