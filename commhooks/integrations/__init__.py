"""Training-framework integrations: register the commhooks DDP hook where a framework wraps DDP.

One module per framework, each importing its framework only when imported itself:

- :mod:`commhooks.integrations.lightning`: ``CompressedDDPStrategy`` for ``lightning.Trainer``.
- :mod:`commhooks.integrations.huggingface`: ``compress_trainer`` (a ``TrainerCallback``) for
  the transformers ``Trainer``.
- :mod:`commhooks.integrations.accelerate`: ``register_accelerate`` after
  ``accelerator.prepare()``.

Each registers on CPU (gloo) and CUDA alike, exposes the :class:`~commhooks.ddp.CompressionState`
for ``stats()``, and raises when the model it finds is not wrapped in DistributedDataParallel.
"""

from __future__ import annotations

from commhooks.ddp import CompressionState

__all__ = ["stats_line"]


def stats_line(state: CompressionState, rank: int) -> str:
    """One line of a rank's hook stats, for a script to print or log.

    Args:
        state: the hook's state, as an integration returned or exposes it.
        rank: this process's rank, named in the line.

    Returns:
        ``commhooks rank=R steps=S raw_bytes=B wire_bytes=W ratio=Xx``: steps the hook ran,
        bytes a dense all-reduce would have been handed, bytes handed to collectives instead.
    """
    s = state.stats()
    return (
        f"commhooks rank={rank} steps={s.steps} raw_bytes={s.raw_bytes} "
        f"wire_bytes={s.wire_bytes} ratio={s.ratio:.1f}x"
    )
