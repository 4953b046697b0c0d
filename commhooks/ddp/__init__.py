"""PyTorch DDP communication hooks over every commhooks compressor.

``state = commhooks.ddp.register(ddp_model, "topk:ratio=0.01")`` or, with torch's own verbs,
``ddp_model.register_comm_hook(CompressionState("sign", model=ddp_model), compression_hook)``.
For adaptive optimizers, ``commhooks.ddp.compress_updates(ddp_model, optimizer, "sign")``
compresses the optimizer's updates instead of the gradients.
"""

from commhooks.ddp.hooks import bf16_wrapper, compression_hook, fp16_wrapper, register
from commhooks.ddp.updates import compress_updates, local_hook
from commhooks.engine.state import CommStats, CompressionState, HookOptions

__all__ = [
    "CommStats",
    "CompressionState",
    "HookOptions",
    "bf16_wrapper",
    "compress_updates",
    "compression_hook",
    "fp16_wrapper",
    "local_hook",
    "register",
]
