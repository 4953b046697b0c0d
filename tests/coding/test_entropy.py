"""Entropy coding: bit-exact round trips, rate close to the empirical entropy, corruption."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commhooks.coding import entropy
from commhooks.coding.bitpack import bits_for, symbols_nbytes
from commhooks.coding.entropy import EntropyReport, decode, encode, report
from commhooks.coding.symbols import decode_symbols, encode_symbols


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _geometric(n: int, alphabet: int, p: float, seed: int) -> torch.Tensor:
    """Truncated geometric symbols: P(s) ~ (1-p)**s, strongly skewed towards 0."""
    u = torch.rand(n, generator=_gen(seed), dtype=torch.float64)
    s = torch.floor(torch.log1p(-u) / math.log1p(-p)).to(torch.int64)
    return s.clamp_(max=alphabet - 1)


def _gaussian(n: int, alphabet: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, generator=_gen(seed))
    return torch.clamp(torch.round(z * alphabet / 8) + alphabet // 2, 0, alphabet - 1).long()


def _entropy(symbols: torch.Tensor, alphabet: int) -> float:
    p = torch.bincount(symbols.reshape(-1).long(), minlength=alphabet).double()
    p = p[p > 0] / symbols.numel()
    return float(-(p * torch.log2(p)).sum())


def _round_trip(symbols: torch.Tensor, alphabet: int) -> torch.Tensor:
    coded = encode(symbols, alphabet)
    assert coded.dtype == torch.uint8 and coded.dim() == 1
    assert coded.device == symbols.device
    out = decode(coded, alphabet, symbols.numel())
    assert out.dtype == torch.int64 and out.device == symbols.device
    assert torch.equal(out.cpu(), symbols.reshape(-1).long().cpu())
    return coded


# ---------------------------------------------------------------- round trips


def _cases() -> list[tuple[str, torch.Tensor, int]]:
    cases = []
    for a in (2, 3, 17, 256):
        cases += [
            (f"uniform-a{a}", torch.randint(0, a, (5000,), generator=_gen(a)), a),
            (f"geometric-a{a}", _geometric(5000, a, 0.3, a + 1), a),
            (f"gaussian-a{a}", _gaussian(5000, a, a + 2), a),
            (f"single-a{a}", torch.full((777,), a - 1), a),
            (f"count1-a{a}", torch.tensor([a // 2]), a),
            (f"empty-a{a}", torch.zeros(0, dtype=torch.int64), a),
        ]
    cases += [
        ("two-symbols-a2", torch.tensor([0, 1] * 50 + [1] * 900), 2),
        ("two-symbols-a256", torch.tensor([3, 250] * 20 + [3] * 7), 256),
        ("extremes-a256", torch.tensor([0, 255, 0, 255, 255]), 256),
        (
            "one-rare-a17",
            torch.cat([torch.zeros(100_000, dtype=torch.int64), torch.tensor([16])]),
            17,
        ),
        ("all-present-a4", torch.tensor([0, 1, 2, 3]), 4),
    ]
    return cases


_CASES = _cases()


@pytest.mark.parametrize(
    ("symbols", "alphabet"), [c[1:] for c in _CASES], ids=[c[0] for c in _CASES]
)
def test_round_trip_is_bit_exact(symbols: torch.Tensor, alphabet: int) -> None:
    _round_trip(symbols, alphabet)


@pytest.mark.parametrize(
    "dtype",
    [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32],
)
def test_any_integer_dtype_and_shape(dtype: torch.dtype) -> None:
    symbols = torch.randint(0, 100, (7, 13, 3), generator=_gen(5)).to(dtype)
    _round_trip(symbols, 100)


def test_empty_codes_to_nothing_and_single_symbol_to_bitmap() -> None:
    assert encode(torch.zeros(0, dtype=torch.int64), 16).numel() == 0
    # One distinct symbol: only the ceil(alphabet/8)-byte presence bitmap, no ANS words.
    assert encode(torch.full((10_000,), 5), 16).numel() == 2
    assert encode(torch.full((3,), 200), 256).numel() == 32


def test_header_size_is_bitmap_plus_varints() -> None:
    # 4-bit alphabet, all 16 present with counts < 128: 2 bitmap bytes + 15 one-byte varints,
    # then whole uint32 ANS words.
    symbols = torch.arange(16).repeat(100)
    coded = encode(symbols, 16)
    body = coded.numel() - 2 - 15
    assert body > 0 and body % 4 == 0


@settings(max_examples=50, deadline=None)
@given(
    alphabet=st.sampled_from([2, 3, 5, 16, 17, 255, 256]),
    data=st.data(),
)
def test_round_trip_hypothesis(alphabet: int, data: st.DataObject) -> None:
    # Draw a small "vocabulary" first so that skewed and sparse histograms are common.
    vocab = data.draw(
        st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=min(alphabet, 8), unique=True)
    )
    values = data.draw(st.lists(st.sampled_from(vocab), max_size=300))
    symbols = torch.tensor(values, dtype=torch.int64)
    _round_trip(symbols, alphabet)


@settings(max_examples=20, deadline=None)
@given(
    alphabet=st.integers(2, 256),
    n=st.integers(0, 20_000),
    skew=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_hypothesis_large(alphabet: int, n: int, skew: float, seed: int) -> None:
    _round_trip(_geometric(n, alphabet, skew, seed), alphabet)


# ---------------------------------------------------------------- rate


def test_skewed_rate_close_to_entropy() -> None:
    alphabet = 16
    symbols = _geometric(100_000, alphabet, 0.35, seed=7)
    r = report(symbols, alphabet)
    assert isinstance(r, EntropyReport)
    assert r.count == 100_000
    assert r.coded_bytes == encode(symbols, alphabet).numel()
    assert r.bits_per_symbol == pytest.approx(8 * r.coded_bytes / r.count)
    assert r.entropy_bits == pytest.approx(_entropy(symbols, alphabet), rel=1e-12)
    # Header: 2-byte bitmap + at most 15 varints of <= 3 bytes (counts < 2**21).
    header_bits = 8 * (2 + 15 * 3) / r.count
    assert r.entropy_bits <= r.bits_per_symbol <= 1.02 * r.entropy_bits + header_bits
    assert r.bits_per_symbol < bits_for(alphabet)
    assert r.coded_bytes < symbols_nbytes(r.count, alphabet)


def test_report_edge_cases() -> None:
    empty = report(torch.zeros(0, dtype=torch.int64), 4)
    assert empty == EntropyReport(count=0, coded_bytes=0, bits_per_symbol=0.0, entropy_bits=0.0)
    single = report(torch.full((800,), 1), 4)
    assert single.entropy_bits == 0.0 and single.coded_bytes == 1
    assert single.bits_per_symbol == pytest.approx(0.01)


# ---------------------------------------------------------------- bad input and corruption


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alphabet"):
        encode(torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="alphabet"):
        encode(torch.tensor([0]), entropy.MAX_ALPHABET + 1)
    with pytest.raises(ValueError, match="symbols"):
        encode(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="symbols"):
        encode(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match="dtype"):
        encode(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="count"):
        decode(torch.zeros(0, dtype=torch.uint8), 4, -1)
    with pytest.raises(ValueError, match="dtype"):
        decode(torch.zeros(4, dtype=torch.int32), 4, 1)


def _coded_sample() -> tuple[torch.Tensor, int, int]:
    symbols = _gaussian(2000, 16, seed=3)
    return encode(symbols, 16), 16, symbols.numel()


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 8, 40])
def test_truncated_data_raises(cut: int) -> None:
    coded, alphabet, count = _coded_sample()
    with pytest.raises((ValueError, RuntimeError)):
        decode(coded[: coded.numel() - cut], alphabet, count)


@pytest.mark.parametrize("cut", [0, 1, 2, 10])
def test_truncated_header_raises(cut: int) -> None:
    coded, alphabet, count = _coded_sample()
    with pytest.raises((ValueError, RuntimeError)):
        decode(coded[:cut], alphabet, count)


def test_wrong_count_and_trailing_bytes_raise() -> None:
    coded, alphabet, count = _coded_sample()
    with pytest.raises(ValueError):
        decode(coded, alphabet, count + 1)
    with pytest.raises(ValueError):
        decode(coded, alphabet, count - 1)
    with pytest.raises(ValueError):
        decode(torch.cat([coded, torch.zeros(4, dtype=torch.uint8)]), alphabet, count)
    single = encode(torch.full((5,), 2), 4)
    with pytest.raises(ValueError):
        decode(torch.cat([single, torch.ones(1, dtype=torch.uint8)]), 4, 5)
    with pytest.raises(ValueError):
        decode(torch.ones(1, dtype=torch.uint8), 4, 0)


def test_corrupted_bytes_raise() -> None:
    coded, alphabet, count = _coded_sample()
    gen = _gen(11)
    positions = torch.randperm(coded.numel(), generator=gen)[:40].tolist()
    # Every byte position in header and body: a flipped byte must be detected.
    for pos in [0, 1, 2, 5, coded.numel() - 1, *positions]:
        bad = coded.clone()
        bad[pos] ^= 0x5A
        with pytest.raises((ValueError, RuntimeError)):
            decode(bad, alphabet, count)


@settings(max_examples=50, deadline=None)
@given(
    garbage=st.binary(max_size=64),
    alphabet=st.sampled_from([2, 3, 16, 256]),
    count=st.integers(0, 100),
)
def test_garbage_never_crashes(garbage: bytes, alphabet: int, count: int) -> None:
    data = torch.tensor(list(garbage), dtype=torch.uint8)
    try:
        out = decode(data, alphabet, count)
    except (ValueError, RuntimeError):
        return
    # Anything accepted must at least be a well-formed symbol array.
    assert out.shape == (count,) and out.dtype == torch.int64
    assert bool(((out >= 0) & (out < alphabet)).all())


# ---------------------------------------------------------------- through symbols.py


@pytest.mark.parametrize("alphabet", [2, 3, 16, 17, 256])
def test_encode_symbols_round_trip(alphabet: int) -> None:
    for symbols in (
        _geometric(20_000, alphabet, 0.5, seed=alphabet),
        torch.randint(0, alphabet, (20_000,), generator=_gen(alphabet)),
        torch.full((100,), alphabet - 1),
        torch.zeros(0, dtype=torch.int64),
    ):
        wire = encode_symbols(symbols, alphabet, use_entropy=True)
        out = decode_symbols(wire, alphabet, symbols.numel(), use_entropy=True)
        assert torch.equal(out, symbols)


def test_encode_symbols_picks_entropy_when_it_pays() -> None:
    symbols = _geometric(50_000, 16, 0.5, seed=1)
    wire = encode_symbols(symbols, 16, use_entropy=True)
    assert int(wire[0]) == 1  # entropy tag
    assert wire.numel() == 1 + encode(symbols, 16).numel()
    assert wire.numel() < symbols_nbytes(symbols.numel(), 16)


@pytest.mark.parametrize("alphabet", [2, 16, 256])
def test_encode_symbols_falls_back_to_packing_for_uniform(alphabet: int) -> None:
    symbols = torch.randint(0, alphabet, (50_000,), generator=_gen(99))
    wire = encode_symbols(symbols, alphabet, use_entropy=True)
    assert int(wire[0]) == 0  # packed tag: uniform symbols cannot beat the packed width
    assert wire.numel() == 1 + symbols_nbytes(symbols.numel(), alphabet)
    assert torch.equal(decode_symbols(wire, alphabet, symbols.numel(), use_entropy=True), symbols)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip() -> None:
    symbols = _gaussian(100_000, 16, seed=4).to(torch.uint8).cuda()
    coded = _round_trip(symbols, 16)
    assert coded.is_cuda
    wire = encode_symbols(symbols, 16, use_entropy=True)
    assert wire.is_cuda
    out = decode_symbols(wire, 16, symbols.numel(), use_entropy=True)
    assert out.is_cuda and torch.equal(out, symbols.long())
    r = report(symbols, 16)
    assert r.coded_bytes == coded.numel()
