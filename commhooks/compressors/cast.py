"""Half-precision casts (fp16, bf16): the simplest summable compression, 2x over fp32."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks._validate import check_bool
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
    SingleRoundExchange,
    check_group,
)
from commhooks.feedback import (
    FusedFeedbackExchange,
    FusedPath,
    on_device,
    register_fused,
    write_residual,
)
from commhooks.kernels import backend_for, backend_for_device
from commhooks.kernels.backend import Backend, Finite, host_finite
from commhooks.registry import register

__all__ = ["Bf16Config", "Cast", "CastConfig", "Fp16Config", "FusedCastExchange"]


@dataclass(frozen=True)
class CastConfig(CompressorConfig):
    """Cast to a 16-bit float for the wire.

    Args:
        prescale: in an all-reduce exchange, divide by the world size before casting and
            multiply back after, as torch's ``fp16_compress_hook`` does, so the sum of n
            gradients cannot overflow fp16 where each one fits.

    Tuning: fp16 keeps 10 mantissa bits but overflows above 65504; bf16 keeps fp32's range with
    7 mantissa bits. Use bf16 unless gradients are known to be small and precision matters.
    """

    target: ClassVar[torch.dtype] = torch.float16
    prescale: bool = True

    def __post_init__(self) -> None:
        check_bool("prescale", self.prescale)


@dataclass(frozen=True)
class Fp16Config(CastConfig):
    __doc__ = CastConfig.__doc__
    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16


@dataclass(frozen=True)
class Bf16Config(CastConfig):
    __doc__ = CastConfig.__doc__
    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16


@register(Fp16Config, Bf16Config)
class Cast(Compressor[CastConfig]):
    """fp16 / bf16 cast; see :class:`CastConfig`."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kind=Kind.CAST, summable=True, static_size=True, unbiased=False)

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        return (tensor.reshape(-1).to(self.config.target),), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        return payload[0]

    def exchange(
        self,
        tensors: Sequence[Tensor],
        keys: Sequence[str | None] | None = None,
        world_size: int = 1,
    ) -> Exchange:
        keys = check_group(tensors, keys, world_size)
        return SingleRoundExchange(self, tensors, keys, prescale=self._prescale(world_size))

    def _prescale(self, world_size: int) -> float:
        return 1.0 / world_size if self.config.prescale else 1.0


class _CastFeedback(FusedPath):
    """The casts' fused error feedback: the cast kernels on fp32 tensors."""

    def compress(
        self, codec: Compressor[Any], g: Tensor, e: Tensor, key: str | None
    ) -> tuple[Payload, Any] | None:
        """All-gather transports: two passes, and None (residual untouched) where a cast
        value is not finite."""
        assert isinstance(codec, Cast)
        target = codec.config.target
        ops = _cast_ops(target, g, e) if _fp32(g, e) else None
        if ops is None:
            return None
        half = torch.empty(g.numel(), dtype=target, device=g.device)
        finite = ops.cast_encode(g, e, 1.0, half)
        if on_device():  # the residual kernel reads the flag: nothing read back
            ops.cast_residual(g, e, 1.0, half, 1.0, finite)
            return (half,), None
        if not host_finite(finite):  # all-gather transports: their one host read
            return None
        ops.cast_residual(g, e, 1.0, half, 1.0, True)
        return (half,), None

    def exchange(
        self,
        codec: Compressor[Any],
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        world_size: int,
        decay: float,
    ) -> Exchange | None:
        """Error feedback around the cast in two passes over the gradient where the cast
        kernels serve (fp32 gradients and residuals only); see :class:`FusedCastExchange`."""
        assert isinstance(codec, Cast)
        fp32 = all(_fp32(t, e) for t, e in zip(tensors, residuals))
        ops = backend_for_device(tensors[0].device, "cast")
        if not (fp32 and ops is not None and ops.casts(codec.config.target)):
            return None
        return FusedCastExchange(
            codec.config.target, tensors, residuals, codec._prescale(world_size), decay
        )


register_fused(Cast, _CastFeedback())


def _cast_ops(target: torch.dtype, *tensors: Tensor, numel: int | None = None) -> Backend | None:
    """The backend whose cast kernels serve these tensors, or None (torch formulas)."""
    ops = backend_for(*tensors, op="cast", numel=numel)
    return ops if ops is not None and ops.casts(target) else None


def _fp32(tensor: Tensor, residual: Tensor) -> bool:
    # Other dtypes keep the torch path's rounding (fp16 gradients are prescaled in fp16 there).
    return tensor.dtype == residual.dtype == torch.float32


class FusedCastExchange(FusedFeedbackExchange):
    """A cast's error-feedback exchange, fused: the same numbers as compensating, casting and
    updating the residual op by op, in fewer passes over memory.

    Encoding writes each ``h = half((g + e) * s)`` into one wire buffer (one pass, nothing
    else written, so an abandoned exchange leaves the residuals as they were); the residual
    ``e = decay * ((g + e) - float(h) / s)`` is written when :meth:`result` is first read
    (from ``g`` and ``e`` read again, so the caller leaves them alone until then), unless
    ``h`` or ``h / s`` was not finite (on a device, the kernel reads the encoder's flag: no
    host read); the result decodes ``float(sum h) / s``. Tensors the kernels do not take
    (small ones on the CPU) run the same formulas as torch ops.
    """

    def __init__(
        self,
        target: torch.dtype,
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        scale: float,
        decay: float,
    ) -> None:
        super().__init__(tensors, residuals, decay)
        self._scale = scale
        sizes = [g.numel() for g in self._grads]
        device = self._grads[0].device if self._grads else torch.device("cpu")
        self._wire = torch.empty(sum(sizes), dtype=target, device=device)
        self._sent = list(self._wire.split(sizes))
        # Per tensor: the kernel's flag (h finite), None for the torch formulas, which check
        # the residual themselves.
        self._finite: list[Finite | None] = []
        self._ops = [_cast_ops(target, g, e) for g, e in zip(self._grads, self._residuals)]
        for g, e, h, ops in zip(self._grads, self._residuals, self._sent, self._ops):
            if ops is not None:
                self._finite.append(ops.cast_encode(g, e, scale, h))
            else:
                h.copy_((g + e).mul_(scale) if scale != 1.0 else g + e)
                self._finite.append(None)

    def message(self) -> Message | None:
        if self._reduced is not None or not self._grads:
            return None
        return Message((self._wire,), ReduceOp.SUM)

    def receive(self, reduced: Sequence[Tensor]) -> None:
        (summed,) = reduced
        self._reduced = list(summed.reshape(-1).split([g.numel() for g in self._grads]))

    def result(self) -> list[Tensor]:
        return self._decode(self._ready())

    def result_into(self, outs: Sequence[Tensor], divisor: float) -> None:
        """``float(sum h) / s / divisor`` decoded straight into ``outs`` (after the residuals,
        which read the inputs, are written)."""
        target = self._wire.dtype
        for h, g, o in zip(self._ready(), self._grads, outs):
            ops = _cast_ops(target, g, o) if o.dtype == torch.float32 else None
            if ops is not None and h.is_contiguous():
                ops.cast_decode(h, self._scale, o.view(-1), divisor)
            else:
                o.copy_(h.to(torch.float32).div_(self._scale).div_(divisor).view(o.shape))

    def local(self) -> list[Tensor]:
        return self._decode(self._sent)

    def _commit(self) -> None:
        s, decay = self._scale, self._decay
        rows = zip(self._grads, self._residuals, self._sent, self._finite, self._ops)
        for g, e, h, finite, ops in rows:
            if ops is not None and finite is not None:
                ops.cast_residual(g, e, s, h, decay, finite)
            elif finite is None:
                # Kept only where every element is finite, decided on the device (no read).
                write_residual(g + e, h.to(e.dtype).div_(s), decay, keep="device", into=e)

    def _decode(self, halves: Sequence[Tensor]) -> list[Tensor]:
        out = []
        target = self._wire.dtype
        for h, g, shape in zip(halves, self._grads, self._shapes):
            ops = _cast_ops(target, g, numel=h.numel())
            if ops is not None and h.is_contiguous():
                t = ops.cast_decode(h, self._scale)
            else:
                t = h.to(torch.float32).div_(self._scale)
            out.append(t.view(shape))
        return out
