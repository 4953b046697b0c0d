"""DiLoCo and Streaming DiLoCo: rounds of local steps, then compressed pseudo-gradients.

Each replica takes ``sync_every`` (H) steps of its own optimizer (AdamW, typically); then the
replicas' pseudo-gradients (global weights minus local weights), compressed with per-replica
error feedback, are averaged through the engine and applied to the global weights by an outer
optimizer (Nesterov SGD), and every replica continues from the new global weights.

    diloco = DiLoCo(model, inner_optimizer, sync_every=30, compressor="uniform:bits=4")
    for x, y in batches:
        loss_fn(model(x), y).backward()
        inner_optimizer.step(); inner_optimizer.zero_grad()
        diloco.step()          # every rank calls it every step; syncs when one is due

With ``fragments=N`` (Streaming DiLoCo) the parameters are split into N fragments, one of which
is synced every H/N steps, so the bytes per sync fall N-fold; with ``delay=τ`` a fragment's
exchange starts τ steps before it is applied, on the engine's communication worker, while the
next inner steps run. A replica may be several ranks (the model wrapped in DDP over the
replica's ranks): ``process_group`` is then the group of one rank per replica.
"""

from commhooks.diloco.config import (
    OUTER_LR,
    OUTER_MOMENTUM,
    DiLoCoConfig,
    DiLoCoStats,
    FragmentStats,
    split_fragments,
)
from commhooks.diloco.diloco import DiLoCo

__all__ = [
    "OUTER_LR",
    "OUTER_MOMENTUM",
    "DiLoCo",
    "DiLoCoConfig",
    "DiLoCoStats",
    "FragmentStats",
    "split_fragments",
]
