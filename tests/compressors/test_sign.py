"""Scaled sign: mean-magnitude scales (per tensor or chunk), exact bytes, majority vote."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import commhooks
from commhooks.compressors.base import Kind, compute_dtype
from commhooks.compressors.sign import Sign, SignConfig

SHAPES = [(0,), (1,), (1023,), (7, 13), (2, 3, 4, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def reference(x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """sign(x) (0 -> +) times the mean |x| of its tensor or chunk, in fp64."""
    flat = x.double().reshape(-1)
    signs = torch.where(flat >= 0, 1.0, -1.0).double()
    if chunk is None:
        return signs * flat.abs().mean()
    scales = torch.cat(
        [flat[i : i + chunk].abs().mean().reshape(1) for i in range(0, len(flat), chunk)]
    )
    return signs * scales.repeat_interleave(chunk)[: flat.numel()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [None, 1, 100, 5000])
def test_decodes_to_sign_times_mean_magnitude(dtype: torch.dtype, chunk: int | None) -> None:
    c = Sign(SignConfig(chunk=chunk))
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        payload, ctx = c.compress(x)
        y = c.decompress(payload, ctx)
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel() == 0:
            continue
        expected = reference(x, chunk).to(dtype).reshape(x.shape)
        torch.testing.assert_close(y, expected, rtol=2e-6 if dtype.itemsize >= 4 else 1e-2, atol=0)


def test_zero_maps_to_plus_and_last_chunk_is_not_diluted() -> None:
    x = torch.tensor([0.0, -2.0, 4.0, -6.0, 1.0])
    y = commhooks.compressor("sign:chunk=4").decompress(
        *commhooks.compressor("sign:chunk=4").compress(x)
    )
    # Chunk 1 mean |x| = 3; chunk 2 is the single element 1 (not 1/4 from zero padding).
    torch.testing.assert_close(y, torch.tensor([3.0, -3.0, 3.0, -3.0, 1.0]))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4097])
@pytest.mark.parametrize("chunk", [None, 64])
def test_payload_bytes_are_exact(n: int, chunk: int | None) -> None:
    c = Sign(SignConfig(chunk=chunk))
    scales = 1 if chunk is None else math.ceil(n / chunk)
    for dtype in (torch.float16, torch.float64):
        payload, _ = c.compress(torch.randn(n).to(dtype))
        assert payload[0].dtype == torch.uint8 and payload[1].dtype == torch.float32
        assert c.nbytes(payload) == math.ceil(n / 8) + 4 * scales


def test_mean_aggregation_is_the_sum_of_decoded() -> None:
    c = commhooks.compressor("sign")
    xs = [torch.randn(300) for _ in range(3)]
    compressed = [c.compress(x) for x in xs]
    ctx = compressed[0][1]
    expected = sum(c.decompress(p, ctx) for p, _ in compressed)
    torch.testing.assert_close(c.aggregate([p for p, _ in compressed], ctx), expected)


def test_majority_vote_by_hand() -> None:
    c = commhooks.compressor("sign:aggregation=majority")
    xs = [
        torch.tensor([1.0, -1.0, 2.0, -2.0]),  # mean |x| 1.5
        torch.tensor([1.0, 1.0, -4.0, -4.0]),  # 2.5
        torch.tensor([-3.0, 1.0, -3.0, 1.0]),  # 2.0
    ]
    compressed = [c.compress(x) for x in xs]
    out = c.aggregate([p for p, _ in compressed], compressed[0][1])
    # Column votes: ++- -> +, -++ -> +, +-- -> -, --+ -> -. Sum of scales: 6.
    torch.testing.assert_close(out, torch.tensor([6.0, 6.0, -6.0, -6.0]))


def test_majority_ties_go_to_plus_and_chunks_sum_their_scales() -> None:
    c = commhooks.compressor("sign:aggregation=majority,chunk=2")
    xs = [torch.tensor([1.0, -1.0, 5.0, 3.0]), torch.tensor([-3.0, 3.0, -1.0, 1.0])]
    compressed = [c.compress(x) for x in xs]
    out = c.aggregate([p for p, _ in compressed], compressed[1][1])
    # Elements 0-2 tie (one + and one -) and go to +; element 3 is + on both ranks.
    # Chunk scales: 1 + 3 = 4 and 4 + 1 = 5.
    torch.testing.assert_close(out, torch.tensor([4.0, 4.0, 5.0, 5.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", [1, 2, 5])
def test_majority_vote_matches_a_reference(dtype: torch.dtype, world: int) -> None:
    gen = torch.Generator().manual_seed(world)
    c = commhooks.compressor("sign:aggregation=majority")
    xs = [torch.randn(7, 13, generator=gen).to(dtype) for _ in range(world)]
    compressed = [c.compress(x) for x in xs]
    out = c.aggregate([p for p, _ in compressed], compressed[0][1])
    cd = compute_dtype(dtype)  # a sum over ranks stays in the compute dtype
    assert out.shape == (7, 13) and out.dtype == cd
    vote = sum(torch.where(x >= 0, 1, -1) for x in xs)
    scale = sum(x.double().abs().mean() for x in xs)
    expected = (torch.where(vote >= 0, 1.0, -1.0).double() * scale).to(cd)
    torch.testing.assert_close(out, expected)


def test_entropy_codes_runs_of_signs() -> None:
    # A gradient with dead units: long runs of zeros, which all map to +.
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(3))
    x[5000:35000] = 0.0
    plain = commhooks.compressor("sign")
    coded = commhooks.compressor("sign:entropy=true")
    assert plain.capabilities.static_size and not coded.capabilities.static_size
    pp, pctx = plain.compress(x)
    cp, cctx = coded.compress(x)
    torch.testing.assert_close(coded.decompress(cp, cctx), plain.decompress(pp, pctx))
    assert coded.nbytes(cp) < plain.nbytes(pp) / 2
    majority = commhooks.compressor("sign:entropy=true,aggregation=majority")
    torch.testing.assert_close(
        majority.aggregate([majority.compress(x)[0]] * 3, cctx), 3 * plain.decompress(pp, pctx)
    )
    # Random signs do not compress: the coder falls back to plain bits plus one tag byte.
    z = torch.randn(40_000, generator=torch.Generator().manual_seed(4))
    assert coded.nbytes(coded.compress(z)[0]) == plain.nbytes(plain.compress(z)[0]) + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("spec", ["sign", "sign:chunk=64", "sign:aggregation=majority"])
def test_non_finite_input_gives_non_finite_output(spec: str, bad: float) -> None:
    c = commhooks.compressor(spec)
    for dtype in DTYPES:
        x = torch.randn(300).to(dtype)
        x[100] = bad
        payload, ctx = c.compress(x)
        assert not torch.isfinite(c.decompress(payload, ctx)[100])
        clean, _ = c.compress(torch.randn(300).to(dtype))
        assert not torch.isfinite(c.aggregate([clean, payload], ctx)[100])


finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.one_of(finite, finite, finite, non_finite), min_size=1, max_size=300),
    chunk=st.one_of(st.none(), st.integers(1, 64)),
)
def test_hypothesis_inputs(values: list[float], chunk: int | None) -> None:
    c = Sign(SignConfig(chunk=chunk))
    x = torch.tensor(values, dtype=torch.float32)
    y = c.decompress(*c.compress(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).all()
        return
    torch.testing.assert_close(y.double(), reference(x, chunk), rtol=1e-5, atol=0)


def test_capabilities() -> None:
    caps = commhooks.compressor("sign").capabilities
    assert caps.kind == Kind.QUANTIZER and caps.static_size
    assert not caps.summable and not caps.unbiased and caps.rounds == 1


def test_spec_strings_and_registry() -> None:
    assert "sign" in commhooks.available()
    c = commhooks.compressor("sign:chunk=512,aggregation=majority,entropy=true")
    assert c.config == SignConfig(chunk=512, aggregation="majority", entropy=True)
    assert commhooks.compressor(c.config.spec()).config == c.config
    assert commhooks.compressor("sign:chunk=none").config.chunk is None


@pytest.mark.parametrize(
    "spec,field",
    [
        ("sign:chunk=0", "chunk"),
        ("sign:chunk=1.5", "chunk"),
        ("sign:aggregation=median", "aggregation"),
        ("sign:entropy=perhaps", "entropy"),
    ],
)
def test_bad_config_names_the_field(spec: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        commhooks.compressor(spec)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "spec", ["sign", "sign:chunk=100", "sign:entropy=true", "sign:aggregation=majority"]
)
def test_cuda_matches_cpu(spec: str) -> None:
    c = commhooks.compressor(spec)
    x = torch.randn(257, 33)
    payload, ctx = c.compress(x.cuda())
    assert all(t.device.type == "cuda" for t in payload)
    y = c.decompress(payload, ctx)
    assert y.device.type == "cuda" and y.shape == x.shape
    torch.testing.assert_close(y.cpu(), c.decompress(*c.compress(x)))
    out = c.aggregate([payload, payload], ctx)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), 2 * y.cpu())
