"""Scaled sign compression: one bit per element plus the mean magnitude (signSGD / EF-signSGD).

Each element decodes to ``+scale`` (``x >= 0``) or ``-scale`` with ``scale = mean|x|`` over the
tensor or over each chunk, the l1-optimal scale for a sign vector (Karimireddy et al., 2019).
Aggregation is either the plain sum of the decoded tensors or signSGD's majority vote
(Bernstein et al., 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_choice, check_int
from commhooks.coding.bitpack import pack_symbols, unpack_symbols
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
from commhooks.feedback.residual import on_device, refuses
from commhooks.kernels import Backend, FusedCodec
from commhooks.registry import register

__all__ = ["Sign", "SignConfig", "SignKernels"]


@dataclass(frozen=True)
class SignConfig(CompressorConfig):
    """1-bit scaled sign.

    Args:
        chunk: ``None`` for one scale per tensor, else one scale per ``chunk`` elements (4 bytes
            each), which tracks layers whose magnitude varies along the tensor.
        aggregation: ``"mean"`` sums the decoded tensors (the transport divides by the world
            size); ``"majority"`` sends ``sign(sum of signs) * (sum of scales)``, i.e. the
            majority-vote direction at the mean scale after the transport's division, with
            ties going to ``+``.
        entropy: entropy-code the sign bits. The bits are coded eight at a time as byte
            symbols (alphabet 256), so runs of equal signs (zero gradients of dead units map to
            ``+``) are exploited and not only the +/- imbalance; the size becomes
            data-dependent, and coding falls back to plain bits (plus one tag byte) when it
            does not pay.

    Tuning: 32x smaller than fp32 and very biased: use it with error feedback (EF-signSGD)
    and ``aggregation="mean"``. Majority vote is robust to a minority of bad workers but
    discards magnitude information beyond the scale; it needs no error feedback to converge on
    well-behaved problems. A ``chunk`` of a few thousand helps layers mixing very different
    magnitudes.
    """

    name: ClassVar[str] = "sign"
    chunk: int | None = None
    aggregation: Literal["mean", "majority"] = "mean"
    entropy: bool = False

    def __post_init__(self) -> None:
        if self.chunk is not None:
            check_int("chunk", self.chunk, lo=1)
        check_choice("aggregation", self.aggregation, ("mean", "majority"))
        check_bool("entropy", self.entropy)


@register(SignConfig)
class Sign(Compressor[SignConfig]):
    """Scaled sign compressor; see :class:`SignConfig`."""

    def __init__(self, config: SignConfig) -> None:
        super().__init__(config)
        self.kernels = SignKernels(self)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.QUANTIZER,
            summable=False,
            static_size=not self.config.entropy,
            unbiased=False,
        )

    def _chunk_for(self, n: int) -> int:
        chunk = self.config.chunk
        return n if chunk is None or chunk >= n else chunk

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        flat = tensor.reshape(-1).to(compute_dtype(tensor.dtype))
        n = flat.numel()
        mag = flat.abs()
        chunk = self.config.chunk
        if chunk is None or chunk >= n:
            scale = mag.mean().reshape(1)  # NaN/inf propagate into the scale
        else:
            sums = chunked(mag, chunk).sum(1)
            # Mean over real elements only: the last chunk's zero padding must not dilute it.
            counts = torch.full_like(sums, chunk)
            counts[-1] = n - (sums.numel() - 1) * chunk
            scale = sums / counts
        bits = pack_symbols((flat >= 0).to(torch.uint8), 2)
        if self.config.entropy:
            bits = encode_symbols(bits, 256, use_entropy=True)
        return (bits, scale.float()), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        data, scale = payload
        return self._scaled(self._signs(data, ctx.numel), scale.to(compute_dtype(ctx.dtype)))

    def aggregate(
        self, payloads: Sequence[Payload], ctx: Context, out: Tensor | None = None
    ) -> Tensor:
        """``"mean"``: the sum of decoded payloads. ``"majority"``: the vote direction times the
        sum of the ranks' scales (the transport divides by the world size, as for a sum), in
        new memory."""
        if self.config.aggregation == "mean" or ctx.numel == 0 or not payloads:
            return super().aggregate(payloads, ctx, out)
        cd = compute_dtype(ctx.dtype)
        vote = torch.zeros(ctx.numel, dtype=torch.int32, device=ctx.device)
        scale_sum = torch.zeros(payloads[0][1].shape, dtype=cd, device=ctx.device)
        for data, scale in payloads:
            vote.add_(self._signs(data, ctx.numel))
            scale_sum.add_(scale.to(cd))
        direction = torch.where(vote >= 0, 1, -1).to(torch.int32)  # a tie goes to +
        return self._scaled(direction, scale_sum).reshape(ctx.shape)

    def _signs(self, data: Tensor, numel: int) -> Tensor:
        """The decoded signs, +1 or -1, as int32."""
        if self.config.entropy:
            data = decode_symbols(data, 256, (numel + 7) // 8, use_entropy=True)
        return unpack_symbols(data, 2, numel).to(torch.int32).mul_(2).sub_(1)

    def _scaled(self, signs: Tensor, scale: Tensor) -> Tensor:
        """Signs times their tensor's (one scale) or chunk's scale."""
        values = signs.to(scale.dtype)
        if scale.numel() == 1:
            return values * scale
        chunk = self.config.chunk
        assert chunk is not None
        return unchunk(chunked(values, chunk) * scale[:, None], values.numel())


class SignKernels(FusedCodec):
    """Sign's fused kernels: one statistics pass (the chunks' mean magnitudes), one pass for
    the bits and the residual; decoding straight to fp32."""

    op = "sign"
    owner: Sign

    def enabled(self) -> bool:
        return not self.owner.config.entropy

    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        n = g.numel()
        chunk = self.owner._chunk_for(n)
        st = ops.chunk_stats(g, e, chunk, host=not on_device())
        # c - (+-scale) cannot overflow, so the in-place residual update needs no undo.
        # Anything else goes the torch way, which carries NaN/inf out.
        if refuses(st.total, st.amax):
            return None
        sums = st.sums
        counts = torch.full_like(sums, chunk)
        counts[-1] = n - (sums.numel() - 1) * chunk
        scale = (sums / counts).float()
        return ops.sign_encode(g, e, chunk, scale), scale

    def sized(self, payload: Payload, n: int) -> bool:
        data, scale = payload
        return data.numel() == (n + 7) // 8 and scale.numel() == -(-n // self.owner._chunk_for(n))

    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        data, scale = payload
        return ops.sign_decode(data, n, self.owner._chunk_for(n), scale, out)
