"""Compressors, one algorithm per module; importing this package registers them all."""

# Importing each module registers its compressor by name.
from commhooks.compressors import (  # noqa: F401
    adaptive,
    cast,
    dgc,
    identity,
    nonuniform,
    pipeline,
    powersgd,
    qsgd,
    randomk,
    sign,
    ternary,
    threshold,
    topk,
    uniform,
)
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
