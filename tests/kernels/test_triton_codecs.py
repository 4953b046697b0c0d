"""The Triton kernels (in Triton's interpreter, on CPU tensors) against the C kernels, byte for
byte: payloads, residuals, decodes and accumulating decodes, every width and rounding mode,
with and without error feedback. The C kernels are checked against the torch path in
tests/native, so the three share one wire layout."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from commhooks.coding.bitpack import symbol_packing
from commhooks.kernels.backend import Backend
from commhooks.kernels.native_backend import NativeBackend
from commhooks.kernels.triton_backend import TritonBackend

# Triton's interpreter on CPU tensors; see conftest.py for CUDA machines.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernels compiled for CUDA here"
)


TRITON, C = TritonBackend(), NativeBackend()
N = 2053  # 5 codes past the last whole byte group, and chunks that end inside a byte


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * torch.logspace(-3, 1, n)
    g[:9] = 0.0
    return g, 0.01 * torch.randn(n, generator=gen)


Encode = Callable[[Backend, torch.Tensor, torch.Tensor | None], torch.Tensor]
Decode = Callable[[Backend, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _codec(name: str, chunk: int, g: torch.Tensor, e: torch.Tensor) -> tuple[Encode, Decode]:
    """Encode and decode of one codec, with the statistics the C kernels compute."""
    n = g.numel()
    st = C.chunk_stats(g, e, chunk, minmax=True, squares=True)
    assert st.lo is not None and st.hi is not None and st.sumsq is not None
    kind, _, arg = name.partition(":")
    if kind == "sign":
        scale = (st.sums / chunk).float()
        return (
            lambda b, x, r: b.sign_encode(x, r, chunk, scale),
            lambda b, d, o: b.sign_decode(d, n, chunk, scale, o),
        )
    if kind in ("uniform", "stochastic-uniform"):
        bits = int(arg)
        lo, step = st.lo, (st.hi - st.lo) / ((1 << bits) - 1)
        seed = 12345678901234 if kind == "stochastic-uniform" else None
        return (
            lambda b, x, r: b.uniform_encode(x, r, chunk, lo, step, bits, seed),
            lambda b, d, o: b.uniform_decode(d, n, chunk, lo, step, bits, o),
        )
    if kind == "qsgd":
        s = int(arg)
        norm, packing = st.sumsq.sqrt().float(), symbol_packing(2 * s + 1)
        return (
            lambda b, x, r: b.stochastic_encode(0, x, r, chunk, norm, s, 2 * s + 1, packing, 99),
            lambda b, d, o: b.stochastic_decode(d, n, chunk, norm, s, 2 * s + 1, packing, o),
        )
    if kind == "ternary":
        scale = torch.tensor([st.amax])
        return (
            lambda b, x, r: b.stochastic_encode(1, x, r, n, scale, 1, 3, (0, 5), 2**61 + 7),
            lambda b, d, o: b.stochastic_decode(d, n, n, scale, 1, 3, (0, 5), o),
        )
    bits = int(arg)  # adaptive's grid
    top, grid = (1 << bits) - 1, torch.tensor([0.05, 0.5 / ((1 << bits) - 1)])
    packing = symbol_packing(top + 1)
    return (
        lambda b, x, r: b.grid_encode(x, r, grid, bits),
        lambda b, d, o: b.stochastic_decode(d, n, n, grid, top, top + 1, packing, o, kind=2),
    )


CODECS = [
    ("sign", N),
    ("sign", 1000),
    *[(f"uniform:{b}", c) for b in (1, 2, 4, 8) for c in (N, 1000)],
    *[(f"stochastic-uniform:{b}", 1000) for b in (1, 2, 4, 8)],
    *[(f"qsgd:{s}", 1000) for s in (1, 2, 3, 7, 127)],  # radix 5, radix 3, 3 and 4 bits, 8
    ("ternary", N),
    *[(f"grid:{b}", N) for b in (1, 3, 5, 8)],  # bit planes of 2+1 and 4+1 bits
]


@pytest.mark.parametrize("feedback", [False, True], ids=["plain", "feedback"])
@pytest.mark.parametrize(("name", "chunk"), CODECS)
def test_same_bytes_as_the_c_kernels(name: str, chunk: int, feedback: bool) -> None:
    g, e = _data(N, 1)
    encode, decode = _codec(name, chunk, g, e)
    e_t, e_c = (e.clone(), e.clone()) if feedback else (None, None)
    data = encode(TRITON, g, e_t)
    assert torch.equal(data, encode(C, g, e_c))
    if feedback:
        assert torch.equal(e_t, e_c)  # the residual, bit for bit
    out = decode(TRITON, data, None)
    assert torch.equal(out, decode(C, data, None))
    assert torch.equal(decode(TRITON, data, out.clone()), decode(C, data, out.clone()))


@pytest.mark.parametrize("chunk", [N, 1000, 64])
@pytest.mark.parametrize("pivot", [None, 0.25])
def test_statistics_match_the_c_kernels(chunk: int, pivot: float | None) -> None:
    """Ranges exactly; sums to float rounding (fp32 blocks gathered in fp64, as in C, but
    blocked differently)."""
    g, e = _data(N, 2)
    a = TRITON.chunk_stats(g, e, chunk, minmax=True, squares=True, pivot=pivot)
    b = C.chunk_stats(g, e, chunk, minmax=True, squares=True, pivot=pivot)
    assert a.lo is not None and a.hi is not None and a.sumsq is not None
    assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi) and a.amax == b.amax
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.sumsq, b.sumsq, rtol=1e-5, atol=1e-6)
    assert a.total == pytest.approx(b.total, rel=1e-5, abs=1e-6)


def test_non_finite_input_shows_in_the_statistics() -> None:
    g, _ = _data(N, 3)
    g[17] = float("nan")
    assert TRITON.chunk_stats(g, None, 1000).total != TRITON.chunk_stats(g, None, 1000).total
