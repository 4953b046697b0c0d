"""Drives one fused error-feedback exchange as a transport would (shared by the kernel tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import commhooks
from commhooks.feedback import fused_exchange

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from _host_reads import CountReads


def run_exchange(
    spec: str, g: torch.Tensor, e: torch.Tensor, decay: float = 1.0, others: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exchange of ``g`` with residual ``e`` at world size ``others + 1``, the other ranks
    simulated as sending the same; returns the wire tensor and the mean (``e`` is updated)."""
    ex = fused_exchange(
        commhooks.compressor(spec), [g], [e], ["w"], world_size=others + 1, decay=decay
    )
    assert ex is not None, spec
    msg = ex.message()
    assert msg is not None
    ex.receive([t * (others + 1) for t in msg.tensors])
    out = torch.empty(g.numel(), device=g.device)
    ex.result_into([out], float(others + 1))
    return msg.tensors[0], out


def host_reads_of_exchange(spec: str, g: torch.Tensor, e: torch.Tensor) -> dict[str, int]:
    """The host reads (as tests/engine counts them) of one exchange."""
    with CountReads() as mode:
        run_exchange(spec, g, e)
    return dict(mode.reads)
