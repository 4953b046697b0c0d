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
    Payload,
    SingleRoundExchange,
    check_group,
)
from commhooks.registry import register

__all__ = ["Bf16Config", "Cast", "CastConfig", "Fp16Config"]


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
        scale = 1.0 / world_size if self.config.prescale else 1.0
        return SingleRoundExchange(self, tensors, keys, prescale=scale)
