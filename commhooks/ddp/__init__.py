"""PyTorch DDP communication hooks over every commhooks compressor.

``state = commhooks.ddp.register(ddp_model, "topk:ratio=0.01")`` or, with torch's own verbs,
``ddp_model.register_comm_hook(CompressionState("sign", model=ddp_model), compression_hook)``.
"""

from commhooks.ddp.hooks import bf16_wrapper, compression_hook, fp16_wrapper, register
from commhooks.engine.state import CommStats, CompressionState, HookOptions

__all__ = [
    "CommStats",
    "CompressionState",
    "HookOptions",
    "bf16_wrapper",
    "compression_hook",
    "fp16_wrapper",
    "register",
]
