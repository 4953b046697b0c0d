"""On a CUDA device (``make gpu-check``): the compiled Triton kernels give the C kernels'
bytes, payloads cross between devices in both directions, error feedback matches, and the
fused cast exchange reads nothing back. Skipped cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch
from _exchange import host_reads_of_exchange, run_exchange

import commhooks
from commhooks import native
from commhooks.feedback import fused_compress
from commhooks.kernels import backend_for

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

N = 1_000_003  # many programs per kernel, and a tail past the last byte group
SPECS = [
    "sign",
    "sign:chunk=2048",
    *[f"uniform:bits={b}" for b in (1, 2, 4, 8)],
    "uniform:bits=4,stochastic=true",
    "uniform:bits=8,stochastic=true,chunk=1000",
    "qsgd:norm=max",
    "qsgd:levels=2,norm=max,chunk=1000",
    "ternary",
    "adaptive",
]


def _data(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g) * torch.logspace(-3, 1, N)
    x[:7] = 0.0
    return x


def _equal(a: tuple, b: tuple, spec: str) -> None:
    for s, t in zip(a, b, strict=True):
        s = s.cpu()
        if spec.startswith("sign") and s.is_floating_point():
            torch.testing.assert_close(s, t, rtol=1e-6, atol=0)  # a mean: float rounding
        else:
            assert torch.equal(s, t), spec


@pytest.mark.parametrize("spec", SPECS)
def test_device_payload_is_the_cpu_kernels(spec: str) -> None:
    x = _data(0)
    gpu, ctx = commhooks.compressor(spec).compress(x.cuda(), "w")
    assert all(t.is_cuda for t in gpu)
    kernels = commhooks.compressor(spec).kernels
    assert kernels is not None and kernels.decodes(gpu, ctx) is not None  # the device kernels
    cpu, cpu_ctx = commhooks.compressor(spec).compress(x, "w")
    _equal(gpu, cpu, spec)
    c = commhooks.compressor(spec)
    on_gpu = c.decompress(gpu, ctx).cpu()
    assert torch.equal(on_gpu, c.decompress(tuple(t.cpu() for t in gpu), cpu_ctx))
    # and the other way: the CPU kernels' bytes decode on the device
    back = c.decompress(tuple(t.cuda() for t in cpu), ctx).cpu()
    torch.testing.assert_close(back, c.decompress(cpu, cpu_ctx), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_device_feedback_residual_is_the_cpu_kernels(spec: str) -> None:
    x, e = _data(1), 0.01 * _data(2)
    r_gpu, r_cpu = e.cuda(), e.clone()
    assert fused_compress(commhooks.compressor(spec), x.cuda(), r_gpu, "w") is not None
    assert fused_compress(commhooks.compressor(spec), x, r_cpu, "w") is not None
    tol = 1e-6 if spec.startswith("sign") else 0.0
    torch.testing.assert_close(r_gpu.cpu(), r_cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", ["bf16", "fp16"])
def test_device_cast_exchange_is_the_cpu_kernels(spec: str) -> None:
    outs = []
    for device in ("cuda", "cpu"):
        g, e = _data(3).to(device), (1e-3 * _data(4)).to(device)
        wire, out = run_exchange(spec, g, e)
        outs.append((wire.cpu().view(torch.int16), out.cpu(), e.cpu()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert host_reads_of_exchange(spec, _data(3).cuda(), torch.zeros(N, device="cuda")) == {}


def test_device_randomk_exchange_is_the_cpu_kernels() -> None:
    """Same wire, mean and residual as the CPU fused path, and nothing read back."""
    outs = []
    for device in ("cuda", "cpu"):
        g, e = _data(5).to(device), (1e-3 * _data(6)).to(device)
        wire, out = run_exchange("randomk:ratio=0.01", g, e, decay=0.5)
        outs.append((wire.cpu(), out.cpu(), e.cpu()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert host_reads_of_exchange("randomk", _data(5).cuda(), torch.zeros(N, device="cuda")) == {}


def test_the_device_backend_serves_cuda_tensors() -> None:
    x = torch.zeros(10, device="cuda")
    backend = backend_for(x, op="uniform")
    assert backend is not None and backend.name == "triton"
    assert backend_for(torch.zeros(native.MIN_NUMEL), op="uniform") is not None  # C on CPU
