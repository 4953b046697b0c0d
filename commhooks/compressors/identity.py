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
    worker, process group and stats as every compressor: the engine all-reduces its buckets in
    place, as plain DDP does, so its step time against DDP's is the engine's own cost. (With
    ``error_feedback=True`` it goes through the error-feedback machinery as well, with
    nothing to feed back.)
    """

    name: ClassVar[str] = "identity"


@register(IdentityConfig)
class Identity(Compressor[IdentityConfig]):
    """Lossless pass-through; see :class:`IdentityConfig`."""

    uses_native_kernels: ClassVar[bool] = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.CAST, summable=True, static_size=True, unbiased=True, passthrough=True
        )

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        return (tensor.reshape(-1),), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        return payload[0]
