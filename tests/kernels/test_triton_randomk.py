"""Random-k's fused error-feedback exchange on the device kernels (Triton's interpreter on
CPU tensors): finiteness stays a device flag, the residual kernel reads it, and the numbers
are the CPU fused path's."""

from __future__ import annotations

import os

import pytest
import torch
from _exchange import host_reads_of_exchange, run_exchange

import commhooks
from commhooks.compressors.randomk import FusedRandomKExchange
from commhooks.feedback import fused_exchange

# Triton's interpreter on CPU tensors; see conftest.py for CUDA machines.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernels compiled for CUDA here"
)

N = 40_000


def _run(mode: str, mp: pytest.MonkeyPatch, bad: bool = False, decay: float = 0.5) -> tuple:
    """One exchange (world size 2, the other rank simulated): the wire, the mean, the
    residual."""
    mp.setenv("COMMHOOKS_KERNELS", mode)
    gen = torch.Generator().manual_seed(0)
    g, e = torch.randn(N, generator=gen), 0.1 * torch.randn(N, generator=gen)
    if bad:
        g[123] = float("inf")
    assert isinstance(
        fused_exchange(commhooks.compressor("randomk"), [g], [e.clone()], ["w"], 2),
        FusedRandomKExchange,
    )
    wire, out = run_exchange("randomk:ratio=0.05", g, e, decay)
    return wire, out, e


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "inf"])
def test_same_numbers_as_the_cpu_fused_path(bad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    device, cpu = _run("triton", monkeypatch, bad), _run("auto", monkeypatch, bad)
    for a, b in zip(device, cpu):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    if bad:  # the wire is poisoned and the residual untouched
        assert device[0].isnan().all()
        gen = torch.Generator().manual_seed(0)
        torch.randn(N, generator=gen)
        assert torch.equal(device[2], 0.1 * torch.randn(N, generator=gen))


def test_reads_nothing_back(triton_kernels: None) -> None:
    assert host_reads_of_exchange("randomk", torch.randn(N), torch.zeros(N)) == {}
