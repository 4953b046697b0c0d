"""Ternary quantization: every element becomes -a, 0 or +a with one scale ``a`` per tensor.

``"stochastic"`` is TernGrad (Wen et al., 2017): ``a = max|x|`` and an element keeps its sign
with probability ``|x|/a``, which is unbiased. ``"threshold"`` is the deterministic
ternarization of Ternary Weight Networks (Li et al., 2016): elements above a multiple of the
mean magnitude keep their sign and share the mean of their magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_choice, check_int, check_real
from commhooks.coding.bitpack import symbols_nbytes
from commhooks.coding.symbols import decode_symbols, encode_symbols
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Kind,
    Payload,
    compute_dtype,
    poison,
)
from commhooks.feedback.residual import on_device, refuses
from commhooks.kernels import Backend, FusedCodec
from commhooks.registry import register

__all__ = ["TernaryKernels", "Ternary", "TernaryConfig"]

# Symbols 0, 1, 2 stand for -a, 0, +a; radix packing puts five in a byte.
_ALPHABET = 3
_RADIX = 5


@dataclass(frozen=True)
class TernaryConfig(CompressorConfig):
    """Ternary quantization with a per-tensor scale.

    Args:
        mode: ``"stochastic"`` (TernGrad: ``a = max|x|``, keep with probability ``|x|/a``;
            unbiased unless ``clip`` is set) or ``"threshold"`` (keep ``|x| > threshold *
            mean|x|``, ``a`` = mean of the kept magnitudes; deterministic and biased).
        threshold: the keep threshold of ``"threshold"`` mode, in units of the mean magnitude
            (>= 0; ignored in stochastic mode). 0.7 is the TWN approximation of the optimum for
            Gaussian values.
        clip: if set, first clip elements to ``[-clip*std, clip*std]`` (TernGrad's gradient
            clipping, applied in both modes). Makes the result biased; must be > 0.
        entropy: entropy-code the trits (pays when most elements become 0).
        seed: seed of the private generator used in stochastic mode.

    Tuning: the payload is 1.6 bits per element plus 4 bytes. Plain stochastic mode is
    unbiased but noisy when a few outliers set ``a``; TernGrad's ``clip=2.5`` cuts that
    variance a lot for a small bias. Threshold mode is low-variance but biased: use it with
    error feedback.
    """

    name: ClassVar[str] = "ternary"
    mode: Literal["stochastic", "threshold"] = "stochastic"
    threshold: float = 0.7
    clip: float | None = None
    entropy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("stochastic", "threshold"))
        check_real("threshold", self.threshold, lo=0.0)
        if self.clip is not None:
            check_real("clip", self.clip, lo=0.0, lo_open=True)
        check_bool("entropy", self.entropy)
        check_int("seed", self.seed)


@register(TernaryConfig)
class Ternary(Compressor[TernaryConfig]):
    """Ternary quantizer; see :class:`TernaryConfig`."""

    def __init__(self, config: TernaryConfig) -> None:
        super().__init__(config)
        self.kernels = TernaryKernels(self)

    @property
    def capabilities(self) -> Capabilities:
        cfg = self.config
        return Capabilities(
            kind=Kind.QUANTIZER,
            summable=False,
            static_size=not cfg.entropy,
            unbiased=cfg.mode == "stochastic" and cfg.clip is None,
        )

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        cfg = self.config
        flat = tensor.reshape(-1).to(compute_dtype(tensor.dtype))
        if cfg.clip is not None:
            # Population std, so a single element does not give NaN; a non-finite input gives
            # a NaN bound, and clamping to it makes every element NaN.
            bound = flat.std(correction=0) * cfg.clip
            flat = flat.clamp(-bound, bound)
        mag = flat.abs()
        if cfg.mode == "stochastic":
            scale = mag.amax().float()  # NaN-propagating; inf decodes to inf*0 = NaN
            p = mag.div_(scale.to(mag.dtype)).nan_to_num_(0.0, 1.0, 0.0).clamp_(0, 1)
            u = torch.rand(
                p.shape, generator=self.generator(p.device), device=p.device, dtype=p.dtype
            )
            keep = u < p
        else:
            mean = mag.mean()
            keep = mag > mean * cfg.threshold
            count = keep.sum()
            total = torch.where(keep, mag, torch.zeros_like(mag)).sum()
            # A NaN/inf mean keeps nothing, so carry it into the scale explicitly.
            scale = poison(torch.where(count > 0, total / count.clamp(min=1), 0.0), mean).float()
        symbols = torch.where(keep, torch.where(flat < 0, 0, 2), 1)
        data = encode_symbols(symbols, _ALPHABET, use_entropy=cfg.entropy)
        return (data, scale.reshape(1)), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        data, scale = payload
        cd = compute_dtype(ctx.dtype)
        symbols = decode_symbols(data, _ALPHABET, ctx.numel, use_entropy=self.config.entropy)
        return symbols.to(cd).sub_(1).mul_(scale.to(cd))


class TernaryKernels(FusedCodec):
    """TernGrad (stochastic mode, no clipping) in fused kernels: max |c| in one statistics
    pass, then symbols (five a byte) and the residual in one more."""

    op = "stochastic"
    owner: Ternary

    def enabled(self) -> bool:
        cfg = self.owner.config
        return cfg.mode == "stochastic" and cfg.clip is None and not cfg.entropy

    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        n = g.numel()
        st = ops.chunk_stats(g, e, n, host=not on_device())
        if refuses(st.total, st.amax):
            return None
        amax = st.amax if isinstance(st.amax, Tensor) else torch.tensor(st.amax)
        scale = amax.to(g.device, torch.float32).reshape(1)  # max |c|, exactly
        data = ops.stochastic_encode(1, g, e, n, scale, 1, _ALPHABET, (0, _RADIX), self.seed())
        return data, scale

    def sized(self, payload: Payload, n: int) -> bool:
        data, scale = payload
        return data.numel() == symbols_nbytes(n, _ALPHABET) and scale.numel() == 1

    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        data, scale = payload
        return ops.stochastic_decode(data, n, n, scale, 1, _ALPHABET, (0, _RADIX), out)
