"""No compression: the tensor itself on the wire. The dense baseline through the same path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Kind,
    Payload,
)
from commhooks.registry import register

__all__ = ["Identity", "IdentityConfig"]


@dataclass(frozen=True)
class IdentityConfig(CompressorConfig):
    """Send the gradient unchanged (summable, lossless).

    Tuning: nothing to tune. Use it as the dense baseline that goes through the same hook,
    stats and error-feedback machinery as every compressor, e.g. to measure their overhead.
    """

    name: ClassVar[str] = "identity"


@register(IdentityConfig)
class Identity(Compressor[IdentityConfig]):
    """Lossless pass-through; see :class:`IdentityConfig`."""

    uses_native_kernels: ClassVar[bool] = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kind=Kind.CAST, summable=True, static_size=True, unbiased=True)

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        return (tensor.reshape(-1),), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        return payload[0]
