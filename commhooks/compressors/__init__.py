"""Compressors, one algorithm per module, and the codec contract they share.

This package's ``__init__`` loads only the contract (:mod:`.base`); the algorithms register
by name when :mod:`.catalog` imports them, which ``import commhooks`` does."""

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
)

__all__ = [
    "Capabilities",
    "Compressor",
    "CompressorConfig",
    "Context",
    "Exchange",
    "Kind",
    "Message",
    "Payload",
    "ReduceOp",
]
