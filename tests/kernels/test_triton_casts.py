"""The Triton cast kernels (fp16, bf16; in Triton's interpreter on CPU tensors) against the C
kernels bit for bit, and the cast's error-feedback exchange on them: its residuals are
masked by the encoder's device flag, with no host read."""

from __future__ import annotations

import os

import pytest
import torch
from _exchange import host_reads_of_exchange, run_exchange

import commhooks
from commhooks import native
from commhooks.feedback import fused_compress
from commhooks.kernels.backend import host_finite
from commhooks.kernels.native_backend import NativeBackend
from commhooks.kernels.triton_backend import TritonBackend

# Triton's interpreter on CPU tensors; see conftest.py for CUDA machines.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernels compiled for CUDA here"
)


TRITON, C = TritonBackend(), NativeBackend()
N = native.MIN_NUMEL + 3
DTYPES = [torch.float16, torch.bfloat16]


def _data(seed: int, spread: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, generator=gen) * torch.logspace(-spread, spread, N)
    return g, 1e-3 * torch.randn(N, generator=gen)


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_as_the_c_kernels(dtype: torch.dtype, scale: float) -> None:
    g, e = _data(0)
    g[5] = float("nan")  # bf16's NaN is torch's quiet NaN; the flag says not finite
    h_t, h_c = torch.empty(N, dtype=dtype), torch.empty(N, dtype=dtype)
    ok_t, ok_c = TRITON.cast_encode(g, e, scale, h_t), C.cast_encode(g, e, scale, h_c)
    assert torch.equal(h_t.view(torch.int16), h_c.view(torch.int16))
    assert host_finite(ok_t) == host_finite(ok_c) is False
    g[5] = 0.0
    ok_t, ok_c = TRITON.cast_encode(g, e, scale, h_t), C.cast_encode(g, e, scale, h_c)
    assert host_finite(ok_t) and host_finite(ok_c)
    e_t, e_c = e.clone(), e.clone()
    TRITON.cast_residual(g, e_t, scale, h_t, 0.9, ok_t)
    C.cast_residual(g, e_c, scale, h_c, 0.9, ok_c)
    assert torch.equal(e_t, e_c)
    assert torch.equal(
        TRITON.cast_decode(h_t, scale, divisor=3.0), C.cast_decode(h_c, scale, None, 3.0)
    )


# numpy, running the kernel in the interpreter, warns about the fp16 overflow it is testing.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_overflowing_cast_leaves_the_residual_alone(dtype: torch.dtype) -> None:
    g, e = _data(1, spread=40.0 if dtype == torch.bfloat16 else 6.0)
    if dtype == torch.bfloat16:
        g[7] = 3.4e38  # finite in bf16, but c / s overflows fp32 below
    h = torch.empty(N, dtype=dtype)
    flag = TRITON.cast_encode(g, e, 1.0 if dtype == torch.float16 else 1e-3, h)
    assert not host_finite(flag)
    before = e.clone()
    TRITON.cast_residual(g, e, 1.0, h, 1.0, flag)  # reads the flag on the device
    assert torch.equal(e, before)


@pytest.mark.parametrize("spec", ["bf16", "fp16"])
def test_feedback_exchange_on_the_device_kernels(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused exchange (world size 2, the other rank simulated by the sum) on the Triton
    kernels: the wire, the result and the residuals equal the C kernels'."""
    results = []
    for mode in ("triton", "auto"):
        monkeypatch.setenv("COMMHOOKS_KERNELS", mode)
        g, e = _data(2, spread=2.0)
        wire, out = run_exchange(spec, g, e, decay=0.5)
        results.append((wire, out, e))
        fused = fused_compress(commhooks.compressor(spec), g, e.clone(), "w")
        assert fused is not None
    for a, b in zip(*results):
        assert torch.equal(
            a.view(torch.int16) if a.dtype != torch.float32 else a,
            b.view(torch.int16) if b.dtype != torch.float32 else b,
        )


def test_the_fused_exchange_reads_nothing_back(triton_kernels: None) -> None:
    """On the device kernels, nothing of a step's exchange is read on the host (counted as
    tests/engine counts it)."""
    g, e = _data(3, spread=2.0)
    assert host_reads_of_exchange("bf16", g, e) == {}
