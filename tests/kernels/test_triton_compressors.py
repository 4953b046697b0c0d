"""Compressors on the Triton backend (CPU tensors, Triton's interpreter) against the torch
path and the C kernels: the same payload bytes, decodes in every direction, and the same
error-feedback residuals."""

from __future__ import annotations

import os

import pytest
import torch

import commhooks
from commhooks import native
from commhooks.feedback import ErrorFeedback, fused_compress
from commhooks.kernels import backend_for
from commhooks.kernels.triton_backend import TritonBackend

# Triton's interpreter on CPU tensors; see conftest.py for CUDA machines.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernels compiled for CUDA here"
)


N = native.MIN_NUMEL + 27  # large enough for the C kernels, as they are compared here too

# Payloads equal to the torch path's (sign's scales to float rounding: a mean).
DETERMINISTIC = [
    "sign",
    "sign:chunk=1000",
    "uniform:bits=1",
    "uniform:bits=2",
    "uniform:bits=4,chunk=1000",
    "uniform:bits=8",
]
# Own rounding noise (the C kernels' counter hash): payloads equal to the C kernels'.
STOCHASTIC = [
    "uniform:bits=4,stochastic=true",
    "uniform:bits=1,stochastic=true,chunk=1000",
    "qsgd:norm=max",
    "qsgd:levels=2,norm=max,chunk=1000",
    "ternary",
    "adaptive",
]


def _data(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)
    x[:7] = 0.0
    return x


def _compress(spec: str, x: torch.Tensor, mode: str, mp: pytest.MonkeyPatch) -> tuple:
    """A fresh compressor's payload and context with ``COMMHOOKS_KERNELS=mode``."""
    mp.setenv("COMMHOOKS_KERNELS", mode)
    return commhooks.compressor(spec).compress(x, "w")


def _same_payload(a: tuple, b: tuple, spec: str) -> None:
    assert len(a) == len(b)
    for s, t in zip(a, b):
        if spec.startswith("sign") and s.is_floating_point():
            torch.testing.assert_close(s, t, rtol=1e-6, atol=0)
        else:
            assert torch.equal(s, t), spec


@pytest.mark.parametrize("spec", DETERMINISTIC)
def test_payload_is_the_torch_paths(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _data(0)
    fast, ctx = _compress(spec, x, "triton", monkeypatch)
    assert backend_for(*fast, op=commhooks.compressor(spec).kernels.op, numel=N) is not None
    slow, _ = _compress(spec, x, "torch", monkeypatch)
    _same_payload(fast, slow, spec)
    c = commhooks.compressor(spec)
    reference = c.decompress(fast, ctx)  # the torch decoder reads the kernel's bytes
    monkeypatch.setenv("COMMHOOKS_KERNELS", "triton")
    assert torch.equal(c.decompress(fast, ctx), reference)
    assert torch.equal(c.aggregate([fast, slow], ctx), reference + c.decompress(slow, ctx))


@pytest.mark.parametrize("spec", DETERMINISTIC + STOCHASTIC)
def test_payload_is_the_c_kernels(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same bytes as the CPU kernels, and each decodes the other's payload alike."""
    x = _data(1)
    fast, ctx = _compress(spec, x, "triton", monkeypatch)
    cpu, _ = _compress(spec, x, "auto", monkeypatch)
    _same_payload(fast, cpu, spec)
    c = commhooks.compressor(spec)
    from_c = c.decompress(fast, ctx)
    monkeypatch.setenv("COMMHOOKS_KERNELS", "triton")
    assert torch.equal(c.decompress(fast, ctx), from_c)


@pytest.mark.parametrize("spec", DETERMINISTIC + STOCHASTIC)
def test_fused_feedback_residual_is_the_c_kernels(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, e = _data(2), 0.01 * _data(3)
    residuals = []
    for mode in ("triton", "auto"):
        monkeypatch.setenv("COMMHOOKS_KERNELS", mode)
        r = e.clone()
        out = fused_compress(commhooks.compressor(spec), x, r, "w")
        assert out is not None, mode
        residuals.append(r)
    if spec.startswith("sign"):  # the scale is a mean: float rounding apart
        torch.testing.assert_close(residuals[0], residuals[1], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(residuals[0], residuals[1])


@pytest.mark.parametrize("spec", ["uniform:bits=2", "uniform:bits=8,chunk=1000", "sign"])
def test_error_feedback_matches_the_op_by_op_reference(spec: str, triton_kernels: None) -> None:
    """Three steps through ErrorFeedback, fused Triton kernels against op by op."""
    fused, reference = ErrorFeedback(spec), ErrorFeedback(spec, fused=False)
    for step in range(3):
        g = _data(10 + step)
        a, _ = fused.compress("w", g)
        b, _ = reference.compress("w", g)
        _same_payload(a, b, spec)
        fused.commit_step()
        reference.commit_step()
    ea, eb = fused.residual("w"), reference.residual("w")
    tol = 1e-6 if spec == "sign" else 0.0
    torch.testing.assert_close(ea, eb, rtol=tol, atol=tol)


# numpy, running the kernels in the interpreter, warns about the inf it multiplies.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("spec", ["sign", "uniform:bits=4", "qsgd", "ternary"])
def test_non_finite_input_takes_the_torch_path(spec: str, triton_kernels: None) -> None:
    x = _data(4)
    x[100] = float("inf")
    e = torch.zeros(N)
    c = commhooks.compressor(spec)
    assert fused_compress(c, x, e, "w") is None and not e.any()
    payload, ctx = c.compress(x, "w")
    assert not torch.isfinite(c.decompress(payload, ctx)).all()


def test_the_backend_serves_small_tensors_on_devices_only(triton_kernels: None) -> None:
    """No size floor on the device backend; the interpreter serves CPU tensors only when
    asked for."""
    assert TritonBackend().usable(torch.zeros(3))
    assert not TritonBackend().usable(torch.zeros(3, dtype=torch.float64))
    assert not TritonBackend().usable(torch.zeros(0))
