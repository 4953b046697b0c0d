"""Adapters for ``hvd.DistributedOptimizer(compression=...)``: compressors whose payload
survives Horovod's own all-reduce."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from commhooks.compressors.base import Compressor, CompressorConfig, Context
from commhooks.registry import available
from commhooks.registry import compressor as build_compressor

__all__ = ["Compression", "HorovodAdapter", "UnsupportedCompression"]

# Payloads that are one tensor, decode linearly (the decoded average is the average of the
# decoded) and need no exchange beyond the all-reduce itself. Quantizers with a shared scale
# need a scale exchange first, PowerSGD two rounds, top-k and sign an all-gather: those go
# through commhooks.horovod.DistributedOptimizer instead.
_ADAPTABLE = ("identity", "fp16", "randomk")


class HorovodAdapter:
    """One commhooks compressor behind Horovod's ``compress`` / ``decompress`` interface.

    Horovod calls ``compress(grad)`` with no parameter name, so there is no error feedback on
    this path: each gradient is compressed as it is. Random-k draws its shared indices from
    one stream per adapter, which agrees across ranks because every rank compresses the same
    gradients in the same (autograd) order; use its ``unbiased`` scaling here.

    Args:
        compressor: a spec string, config or compressor among ``identity``, ``fp16`` and
            ``randomk``.
    """

    def __init__(self, compressor: str | CompressorConfig | Compressor[Any]) -> None:
        self.compressor = build_compressor(compressor)
        name = self.compressor.config.name
        if name not in _ADAPTABLE:
            why = (
                "Horovod has no bfloat16 all-reduce; use fp16, or bf16 through "
                "commhooks.horovod.DistributedOptimizer"
                if name == "bf16"
                else "its payload cannot be all-reduced by Horovod in one step; use "
                "commhooks.horovod.DistributedOptimizer"
            )
            raise ValueError(f"compressor {name!r}: not usable as Horovod compression: {why}")

    def compress(self, tensor: Tensor) -> tuple[Tensor, Context]:
        payload, ctx = self.compressor.compress(tensor)
        return (payload[0] if payload else tensor.reshape(-1)[:0]), ctx

    def decompress(self, tensor: Tensor, ctx: Context) -> Tensor:
        return self.compressor.decompress((tensor,), ctx)

    def __repr__(self) -> str:
        return f"HorovodAdapter({self.compressor.config.spec()!r})"


class UnsupportedCompression(AttributeError, ValueError):
    """``Compression.<name>`` for a compressor Horovod's own optimizer cannot carry; says why.
    A ValueError (as from :meth:`Compression.of`) and an AttributeError (so ``hasattr`` and
    ``getattr(..., default)`` work)."""


class _Members(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_") or name not in available():
            raise AttributeError(f"type object 'Compression' has no attribute {name!r}")
        try:
            HorovodAdapter(name)
        except ValueError as e:
            raise UnsupportedCompression(
                f"Compression.{name}: {e}; or pass compression={name!r} to "
                "commhooks.horovod.DistributedOptimizer, which carries every compressor"
            ) from None
        raise AttributeError(f"Compression.{name}: use Compression.of({name!r})")


class Compression(metaclass=_Members):
    """Like ``hvd.Compression``: ``none`` and ``fp16`` instances, plus :meth:`randomk`.

    Other compressor names (``Compression.bf16``, ``Compression.topk``) raise
    :class:`UnsupportedCompression`, a ValueError saying why Horovod's optimizer cannot carry
    them."""

    none = HorovodAdapter("identity")
    fp16 = HorovodAdapter("fp16")

    @staticmethod
    def randomk(ratio: float = 0.01, seed: int = 0, unbiased: bool = True) -> HorovodAdapter:
        """Random-k with indices shared through ``seed``: sends ``ratio`` of the values (and no
        indices). ``unbiased`` scales by 1/ratio; without error feedback that keeps the
        gradient's expectation, at the cost of variance (keep ``ratio`` >= 0.1 here)."""
        return HorovodAdapter(f"randomk:ratio={ratio},seed={seed},unbiased={unbiased}")

    @staticmethod
    def of(spec: str | CompressorConfig | Compressor[Any]) -> HorovodAdapter:
        """An adapter for any adaptable spec."""
        return HorovodAdapter(spec)
