"""QSGD (Alistarh et al., 2017): unbiased stochastic quantization to s levels of a bucket norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_choice, check_int
from commhooks.coding.bitpack import symbol_packing, symbols_nbytes
from commhooks.coding.symbols import decode_symbols, encode_symbols
from commhooks.compressors._quant import chunked, unchunk
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Kind,
    Payload,
    compute_dtype,
)
from commhooks.feedback.residual import SAFE_SQUARE_ABS, on_device, refuses
from commhooks.kernels import Backend, FusedCodec
from commhooks.registry import register

__all__ = ["QSGDKernels", "QSGD", "QSGDConfig"]


@dataclass(frozen=True)
class QSGDConfig(CompressorConfig):
    """QSGD stochastic quantization.

    Each bucket of ``chunk`` elements is sent as its norm ``v`` (fp32) and, per element, a sign
    and a level ``l`` in ``0..s``; the element decodes to ``sign * l * v / s``. The level is
    ``floor(s|x|/v)`` or one more, with the probability that makes the result unbiased.

    Args:
        levels: ``s``, the number of non-zero levels per side, 1..127. The symbol alphabet is
            ``2s+1``; radix packing makes ``s=1`` cost 1.6 bits and ``s=2`` about 2.67 bits.
        chunk: bucket size; one norm per bucket.
        norm: ``"l2"`` (the paper's; fewer non-zeros, higher variance) or ``"max"`` (lower
            variance, more non-zero levels, so entropy coding gains less).
        entropy: entropy-code the symbols; with the l2 norm most levels are 0, so this often
            halves the payload, at the price of a data-dependent size.
        seed: seed of the private generator used for the stochastic rounding.

    Tuning: with the l2 norm the variance added to a bucket of ``d`` elements is at most
    ``min(d/s^2, sqrt(d)/s) * v^2``, so keep buckets small (512-2048) when ``s`` is small.
    ``levels=1, norm=l2`` is the sparse ternary regime (pair with ``entropy``); ``levels``
    4-16 is a good default range without error feedback, since QSGD is unbiased.
    """

    name: ClassVar[str] = "qsgd"
    levels: int = 16
    chunk: int = 2048
    norm: Literal["l2", "max"] = "l2"
    entropy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("levels", self.levels, lo=1, hi=127)
        check_int("chunk", self.chunk, lo=1)
        check_choice("norm", self.norm, ("l2", "max"))
        check_bool("entropy", self.entropy)
        check_int("seed", self.seed)


@register(QSGDConfig)
class QSGD(Compressor[QSGDConfig]):
    """QSGD quantizer; see :class:`QSGDConfig`."""

    def __init__(self, config: QSGDConfig) -> None:
        super().__init__(config)
        self.kernels = QSGDKernels(self)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.QUANTIZER,
            summable=False,
            static_size=not self.config.entropy,
            unbiased=True,
        )

    @property
    def _alphabet(self) -> int:
        return 2 * self.config.levels + 1

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        cfg = self.config
        s = cfg.levels
        flat = tensor.reshape(-1).to(compute_dtype(tensor.dtype))
        rows = chunked(flat, cfg.chunk)  # zero padding changes neither norm
        mag = rows.abs()
        absmax = mag.amax(1)
        if cfg.norm == "max":
            norm = absmax
        else:
            # Dividing by the max first keeps the squares from overflowing (1e20 in fp32);
            # NaN/inf still propagate (inf/inf is NaN).
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            norm = torch.linalg.vector_norm(mag / safe[:, None], dim=1) * absmax
        # The wire carries the norm in fp32; quantize against exactly that value.
        wire_norm = norm.float()
        r = mag.div_(wire_norm.to(rows.dtype)[:, None]).mul_(s)
        r = r.nan_to_num_(0.0, float(s), 0.0).clamp_(0, s)  # 0/0 in all-zero buckets
        u = torch.rand(r.shape, generator=self.generator(r.device), device=r.device, dtype=r.dtype)
        level = r.add_(u).floor_().clamp_(max=s)
        symbols = torch.where(rows < 0, -level, level).add_(s)
        data = encode_symbols(
            unchunk(symbols, flat.numel()).to(torch.int64), 2 * s + 1, use_entropy=cfg.entropy
        )
        return (data, wire_norm), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        cfg = self.config
        s = cfg.levels
        data, norm = payload
        cd = compute_dtype(ctx.dtype)
        symbols = decode_symbols(data, 2 * s + 1, ctx.numel, use_entropy=cfg.entropy)
        rows = chunked(symbols.to(cd).sub_(s), cfg.chunk)
        return unchunk(rows * (norm.to(cd) / s)[:, None], ctx.numel)


class QSGDKernels(FusedCodec):
    """QSGD in fused kernels (fp32; the rounding noise is the kernels' own counter hash):
    one statistics pass (the chunks' norms), one pass for symbols and residual."""

    op = "stochastic"
    owner: QSGD

    def enabled(self) -> bool:
        return not self.owner.config.entropy

    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        cfg = self.owner.config
        l2 = cfg.norm == "l2"
        st = ops.chunk_stats(g, e, cfg.chunk, minmax=not l2, squares=l2, host=not on_device())
        if refuses(st.total, st.amax, SAFE_SQUARE_ABS):
            return None
        if l2:
            assert st.sumsq is not None
            norm = st.sumsq.sqrt().float()
        else:
            assert st.lo is not None and st.hi is not None
            norm = torch.maximum(st.lo.abs(), st.hi.abs())
        alphabet = self.owner._alphabet
        packing = symbol_packing(alphabet)
        data = ops.stochastic_encode(
            0, g, e, cfg.chunk, norm, cfg.levels, alphabet, packing, self.seed()
        )
        return data, norm

    def sized(self, payload: Payload, n: int) -> bool:
        data, norm = payload
        chunks = -(-n // self.owner.config.chunk)
        return data.numel() == symbols_nbytes(n, self.owner._alphabet) and norm.numel() == chunks

    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        data, norm = payload
        alphabet = self.owner._alphabet
        cfg = self.owner.config
        packing = symbol_packing(alphabet)
        return ops.stochastic_decode(data, n, cfg.chunk, norm, cfg.levels, alphabet, packing, out)
