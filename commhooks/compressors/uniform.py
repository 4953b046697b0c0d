"""Uniform (min-max) quantization with per-chunk scales, and a summable shared-scale variant.

Normal mode maps each chunk onto ``2**bits`` evenly spaced levels between its minimum and
maximum and packs the level indices; deterministic rounding is off by at most half a step,
stochastic rounding is unbiased.

``shared_scale=True`` trades the tight per-rank range for summability: every rank quantizes
with the same symmetric per-chunk step (agreed on by a MAX all-reduce of the chunks' absolute
maxima), so integer codes from all ranks can be added by a SUM all-reduce and decoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_int
from commhooks.coding.symbols import decode_symbols, encode_symbols
from commhooks.compressors._quant import chunked, unchunk
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Exchange,
    Kind,
    Message,
    Payload,
    ReduceOp,
    check_group,
    compute_dtype,
)
from commhooks.feedback.residual import on_device, refuses
from commhooks.kernels import Backend, FusedCodec
from commhooks.registry import register

__all__ = [
    "SharedScaleExchange",
    "Uniform",
    "UniformConfig",
    "UniformKernels",
    "chunk_absmax",
    "decode_codes",
    "shared_levels",
]

# Code widths tried in turn for shared-scale codes: the narrowest whose headroom leaves >= 1
# level per side once world_size codes are added up.
_CODE_DTYPES = (torch.int8, torch.int16, torch.int32)
# Bit widths the fused native kernels pack (whole codes per byte).
_NATIVE = (1, 2, 4, 8)


@dataclass(frozen=True)
class UniformConfig(CompressorConfig):
    """Uniform min-max quantization.

    Args:
        bits: bits per element, 1..8 (``2**bits`` levels). One bit leaves two levels, the
            chunk's minimum and maximum, and every element moves to one of them: on Gaussian
            values the relative error is about 2.7 (3.3 with ``stochastic``), worse than
            sending zeros (1.0). For one bit per element use ``sign`` (0.60); 2 bits give 0.67.
        chunk: elements per chunk; each chunk has its own scale (two fp32 numbers in normal
            mode, one in shared-scale mode; fp64 for fp64 input).
        stochastic: round to one of the two nearest levels at random with probabilities that
            make the result unbiased, instead of to the nearest one.
        entropy: entropy-code the level indices (smaller for peaked distributions, but the
            payload size becomes data-dependent). Not allowed with ``shared_scale``.
        shared_scale: make the compressor summable (see the module docstring). Codes travel as
            one int8 per element (int16/int32 beyond 127/32767 ranks) whatever ``bits`` is;
            ``bits`` (>= 2) only caps the levels per side, ``L = min(2**(bits-1)-1,
            127 // world_size)``, so that the sum of ``world_size`` codes never overflows.
        seed: seed of the private generator used by stochastic rounding.

    Finite values near fp32's largest in magnitude (possible in fp32 and bf16 only) can overflow
    the fp32 step arithmetic and decode as non-finite; GradScaler then skips the step as for
    any overflow.

    Tuning: 8 bits is near-lossless for gradients, 4 bits with error feedback trains most
    models; smaller chunks track outliers better at 8 (normal) or 4 (shared) bytes per chunk.
    Use ``stochastic=True`` without error feedback, deterministic rounding with it. Use
    ``shared_scale`` to all-reduce (bandwidth independent of the world size) when an
    all-gather of per-rank payloads would cost more: its precision shrinks as the world grows
    (a single level per side from 64 ranks on with int8), so pair it with error feedback.
    """

    name: ClassVar[str] = "uniform"
    bits: int = 8
    chunk: int = 2048
    stochastic: bool = False
    entropy: bool = False
    shared_scale: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("bits", self.bits, lo=1, hi=8)
        check_int("chunk", self.chunk, lo=1)
        for field in ("stochastic", "entropy", "shared_scale"):
            check_bool(field, getattr(self, field))
        check_int("seed", self.seed)
        if self.shared_scale and self.entropy:
            raise ValueError(
                "shared_scale=True with entropy=True: shared-scale codes are summed by an "
                "all-reduce, and summed codes cannot be entropy coded; drop one of them"
            )
        if self.shared_scale and self.bits < 2:
            raise ValueError(
                f"bits={self.bits} with shared_scale=True: symmetric codes need bits >= 2 "
                "(one level each side of zero)"
            )


def shared_levels(bits: int, world_size: int) -> tuple[int, torch.dtype]:
    """Levels per side ``L`` and code dtype for shared-scale codes summed over ``world_size``.

    ``world_size * L`` fits the dtype, so the all-reduced sum cannot overflow.
    """
    want = (1 << (bits - 1)) - 1
    for dtype in _CODE_DTYPES:
        level = min(want, torch.iinfo(dtype).max // world_size)
        if level >= 1:
            return level, dtype
    raise ValueError(f"world_size={world_size}: too many ranks to sum int32 codes")


@register(UniformConfig)
class Uniform(Compressor[UniformConfig]):
    """Uniform min-max quantizer; see :class:`UniformConfig`."""

    def __init__(self, config: UniformConfig) -> None:
        super().__init__(config)
        self.kernels = UniformKernels(self)

    @property
    def capabilities(self) -> Capabilities:
        shared = self.config.shared_scale
        return Capabilities(
            kind=Kind.QUANTIZER,
            summable=shared,
            static_size=not self.config.entropy,
            unbiased=self.config.stochastic,
            rounds=2 if shared else 1,
        )

    # -- normal (min-max) mode ----------------------------------------------------------------

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        cfg = self.config
        flat = tensor.reshape(-1).to(compute_dtype(tensor.dtype))
        if cfg.shared_scale:
            level, dtype = shared_levels(cfg.bits, 1)
            step = chunk_absmax(flat, cfg.chunk) / level
            return (self.symmetric_codes(flat, step, level, dtype), step), None
        top = (1 << cfg.bits) - 1
        rows = chunked(flat, cfg.chunk)
        # amin/amax propagate NaN, and an infinite range makes the step infinite, so a
        # non-finite input poisons its chunk's scales and hence its decoded values.
        lo = rows.amin(1)
        step = (rows.amax(1) - lo) / top
        q = (rows - lo[:, None]) / step[:, None]
        # 0/0 for a constant chunk: any code decodes to lo there.
        q = q.nan_to_num_(0.0, float(top), 0.0)
        codes = self._round(q).clamp_(0, top)
        symbols = unchunk(codes, flat.numel()).to(torch.int64)
        data = encode_symbols(symbols, top + 1, use_entropy=cfg.entropy)
        return (data, torch.stack([lo, step], 1).reshape(-1)), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        cfg = self.config
        if cfg.shared_scale:
            codes, step = payload
            return decode_codes(codes, step, cfg.chunk, ctx.numel)
        data, scales = payload
        top = (1 << cfg.bits) - 1
        symbols = decode_symbols(data, top + 1, ctx.numel, use_entropy=cfg.entropy)
        lo, step = scales.view(-1, 2).unbind(1)
        rows = chunked(symbols.to(scales.dtype), cfg.chunk)
        # Multiply, then add (no fused multiply-add): the native kernel rounds the same way.
        return unchunk(rows * step[:, None] + lo[:, None], ctx.numel)

    def _round(self, q: Tensor, key: str | None = None) -> Tensor:
        """Nearest level, or (stochastic) floor(q + u): level l+1 with probability q - l."""
        if not self.config.stochastic:
            return q.round_()
        gen = self.generator(q.device, key)
        u = torch.rand(q.shape, generator=gen, device=q.device, dtype=q.dtype)
        return q.add_(u).floor_()

    # -- shared-scale mode ----------------------------------------------------------------------

    def symmetric_codes(
        self, flat: Tensor, step: Tensor, level: int, dtype: torch.dtype, key: str | None = None
    ) -> Tensor:
        """Integer codes in [-level, level] of ``flat`` with per-chunk ``step``; ``key`` names
        the tensor's stream of rounding noise (default: the one being compressed)."""
        q = chunked(flat, self.config.chunk) / step[:, None]
        # 0/0 (all-zero chunk) and x/inf (non-finite step, which decodes non-finite anyway).
        q = q.nan_to_num_(0.0, float(level), float(-level))
        codes = self._round(q, key).clamp_(-level, level)
        return unchunk(codes, flat.numel()).to(dtype)

    def exchange(
        self,
        tensors: Sequence[Tensor],
        keys: Sequence[str | None] | None = None,
        world_size: int = 1,
    ) -> Exchange:
        """Two rounds: MAX of per-chunk absolute maxima, then SUM of integer codes."""
        if not self.config.shared_scale:
            return super().exchange(tensors, keys, world_size)
        check_group(tensors, keys, world_size)
        return SharedScaleExchange(self, tensors, world_size, keys)


def chunk_absmax(flat: Tensor, chunk: int) -> Tensor:
    """Per-chunk max |x|; NaN-propagating, zero padding cannot raise it."""
    return chunked(flat, chunk).abs().amax(1)


def decode_codes(codes: Tensor, step: Tensor, chunk: int, numel: int) -> Tensor:
    """Symmetric integer codes (one rank's, or the sum of several) times their chunk's step."""
    rows = chunked(codes.to(step.dtype), chunk)
    return unchunk(rows * step[:, None], numel)


class SharedScaleExchange(Exchange):
    """Shared-scale uniform quantization of a group of tensors, driven by a transport.

    Round 1 all-reduces (MAX) every chunk's max |x|, concatenated over the group in fp32, so all
    ranks agree on ``step = absmax / L``. Round 2 all-reduces (SUM) the integer codes,
    concatenated over the group; ``L`` leaves enough headroom that the sum cannot overflow.
    """

    def __init__(
        self,
        compressor: Uniform,
        tensors: Sequence[Tensor],
        world_size: int,
        keys: Sequence[str | None] | None = None,
    ):
        self._c = compressor
        self._keys = list(keys) if keys is not None else [None] * len(tensors)
        self._chunk = compressor.config.chunk
        self._level, self._dtype = shared_levels(compressor.config.bits, world_size)
        self._shapes = [t.shape for t in tensors]
        self._dtypes = [t.dtype for t in tensors]
        self._flats = [t.reshape(-1).to(compute_dtype(t.dtype)) for t in tensors]
        self._nchunks = [-(-f.numel() // self._chunk) for f in self._flats]
        self._compute = [f.dtype for f in self._flats]
        self._steps: list[Tensor] | None = None
        self._codes: Tensor | None = None
        self._summed: Tensor | None = None
        self._round = 0

    def message(self) -> Message | None:
        if not self._shapes:
            return None
        if self._round == 0:
            absmax = torch.cat([chunk_absmax(f, self._chunk).float() for f in self._flats])
            # NaN is sent as +inf: every MAX implementation keeps an inf (not all keep a NaN),
            # and an infinite step decodes to non-finite values on every rank.
            absmax = absmax.masked_fill_(absmax.isnan(), float("inf"))
            return Message((absmax,), ReduceOp.MAX)
        if self._round == 1:
            assert self._codes is not None
            return Message((self._codes,), ReduceOp.SUM)
        return None

    def receive(self, reduced: Sequence[Tensor]) -> None:
        if self._round == 0:
            (absmax,) = reduced
            self._steps = [
                s.to(cd) / self._level for s, cd in zip(absmax.split(self._nchunks), self._compute)
            ]
            self._codes = torch.cat(
                [
                    self._c.symmetric_codes(f, s, self._level, self._dtype, k)
                    for f, s, k in zip(self._flats, self._steps, self._keys)
                ]
            )
            self._flats = []  # the inputs are no longer needed; free them
            self._round = 1
        elif self._round == 1:
            (self._summed,) = reduced
            self._round = 2
        else:
            raise RuntimeError("exchange: receive() called after both rounds were done")

    def result(self) -> list[Tensor]:
        if self._summed is None:
            if not self._shapes:
                return []
            raise RuntimeError("exchange: result() called before both rounds were received")
        return self._decode(self._summed, keep_compute=True)

    def local(self) -> list[Tensor]:
        if self._codes is None:
            if not self._shapes:
                return []
            raise RuntimeError("exchange: local() called before the scale round was received")
        return self._decode(self._codes)

    def _decode(self, codes: Tensor, keep_compute: bool = False) -> list[Tensor]:
        """Decode codes per tensor: in the input dtype, or the compute dtype for sums."""
        assert self._steps is not None
        sizes = [_numel(s) for s in self._shapes]
        dtypes = self._compute if keep_compute else self._dtypes
        return [
            decode_codes(c, step, self._chunk, n).reshape(shape).to(dtype)
            for c, step, n, shape, dtype in zip(
                codes.split(sizes), self._steps, sizes, self._shapes, dtypes
            )
        ]


def _numel(shape: torch.Size) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class UniformKernels(FusedCodec):
    """Min-max codes of 1, 2, 4 or 8 bits, nearest or stochastic, in fused kernels: one
    statistics pass (each chunk's range), one pass for the codes and the residual."""

    op = "uniform"
    owner: Uniform

    def enabled(self) -> bool:
        cfg = self.owner.config
        return not (cfg.shared_scale or cfg.entropy) and cfg.bits in _NATIVE

    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        cfg = self.owner.config
        n = g.numel()
        st = ops.chunk_stats(g, e, cfg.chunk, minmax=True, host=not on_device())
        # c - decode(code) stays finite, so the residual needs no undo.
        if refuses(st.total, st.amax):
            return None
        lo, hi = st.lo, st.hi
        assert lo is not None and hi is not None
        if n % cfg.chunk:  # the torch path's zero padding is part of the last chunk's range
            lo[-1].clamp_(max=0.0)
            hi[-1].clamp_(min=0.0)
        step = (hi - lo) / ((1 << cfg.bits) - 1)
        # Stochastic rounding draws counter-hash noise seeded from the private generator
        # (reproducible and unbiased, but not torch.rand's stream).
        seed = self.seed() if cfg.stochastic else None
        data = ops.uniform_encode(g, e, cfg.chunk, lo, step, cfg.bits, seed)
        return data, torch.stack([lo, step], 1).reshape(-1)

    def sized(self, payload: Payload, n: int) -> bool:
        data, scales = payload
        cfg = self.owner.config
        return data.numel() == (n * cfg.bits + 7) // 8 and scales.numel() == 2 * -(-n // cfg.chunk)

    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        data, scales = payload
        lo, step = scales.view(-1, 2).unbind(1)
        cfg = self.owner.config
        return ops.uniform_decode(
            data, n, cfg.chunk, lo.contiguous(), step.contiguous(), cfg.bits, out
        )
