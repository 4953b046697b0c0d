"""Error feedback: each worker keeps what compression dropped and adds it back next step.

For a key (a parameter name) and its gradient ``g`` at one step::

    u  = momentum * u + g            # only with DGC momentum correction, else u = g
    c  = u + e                       # compensate with the stored residual e
    s  = decompress(compress(c))     # what this worker actually sends
    e' = decay * (c - s)             # the new residual

so ``u + e == s + e'`` when ``decay == 1``: nothing is lost, only delayed. Residuals are kept in
fp32 (fp64 for fp64 gradients) whatever the gradient's dtype, keyed by stable names rather than
bucket indices, which DDP renumbers when it rebuilds its buckets.

A non-finite gradient is passed through to the payload, so GradScaler sees it and skips the
step; the stored residual and momentum are left as they were, since the skipped step applies
nothing. A step is one transaction: every change a step makes to the memory is journaled
until :meth:`ErrorFeedback.commit_step`, and :meth:`ErrorFeedback.rollback` restores what the
step found, for a step that some rank's overflow in another tensor makes the optimizer skip.

The arithmetic lives in :mod:`.residual` (the finiteness rule and :func:`write_residual`), the
fused paths in :mod:`.fused` (registered by codec and device), the memory in :mod:`.memory`.
"""

from __future__ import annotations

from commhooks.feedback.fused import (
    DEVICES,
    FusedFeedbackExchange,
    FusedPath,
    KernelPath,
    fused_compress,
    fused_exchange,
    fused_path,
    register_fused,
)
from commhooks.feedback.memory import ErrorFeedback, FeedbackConfig
from commhooks.feedback.residual import (
    SAFE_ABS,
    SAFE_SQUARE_ABS,
    SAFE_SUM_ABS,
    Keep,
    all_finite,
    decided_on_device,
    on_device,
    refuses,
    safely_finite,
    write_residual,
)

__all__ = [
    "DEVICES",
    "ErrorFeedback",
    "FeedbackConfig",
    "FusedFeedbackExchange",
    "FusedPath",
    "Keep",
    "KernelPath",
    "SAFE_ABS",
    "SAFE_SQUARE_ABS",
    "SAFE_SUM_ABS",
    "all_finite",
    "decided_on_device",
    "fused_compress",
    "fused_exchange",
    "fused_path",
    "on_device",
    "refuses",
    "register_fused",
    "safely_finite",
    "write_residual",
]
