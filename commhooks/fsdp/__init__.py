"""Gradient compression under FSDP2 (``torch.distributed.fsdp.fully_shard``).

``state = commhooks.fsdp.register(model, "uniform:bits=8")`` on the root module after
``fully_shard``. Two modes, picked from the mesh the model is sharded over:

* hierarchical (custom HSDP): each module sharded over the ranks of a node
  (:func:`node_mesh`); FSDP2 reduce-scatters densely inside the node and the all-reduce hook
  averages each rank's shard across nodes, compressed, with error feedback per shard (1/L of
  the model per rank for L ranks per node);
* reduce-scatter: a mesh over every rank; a custom reduce-scatter compresses each
  destination's chunk once, sends it in one all-to-all and each rank decodes and sums its own
  chunk in fp32 (error feedback, where the codec needs it, holds the unit's whole gradient
  per rank).

See docs/fsdp.md.
"""

from commhooks.fsdp.mesh import HIERARCHICAL, REDUCE_SCATTER, node_mesh
from commhooks.fsdp.register import register
from commhooks.fsdp.state import FSDPCompression

__all__ = [
    "HIERARCHICAL",
    "REDUCE_SCATTER",
    "FSDPCompression",
    "node_mesh",
    "register",
]
