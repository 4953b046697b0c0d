"""The Horovod front end: compression adapters and commhooks' own ``DistributedOptimizer``.

Horovod is imported when these objects are built, not here, so ``import commhooks`` (and this
module) works where Horovod is absent. See docs/horovod.md.
"""

from commhooks.horovod.collectives import HorovodCollectives
from commhooks.horovod.compression import Compression, HorovodAdapter
from commhooks.horovod.optimizer import DistributedOptimizer, broadcast_initial_state
from commhooks.horovod.updates import compress_updates

__all__ = [
    "Compression",
    "DistributedOptimizer",
    "HorovodAdapter",
    "HorovodCollectives",
    "broadcast_initial_state",
    "compress_updates",
]
