"""The averaging engine under every front end: a group of gradient tensors in, their average
over ranks out, through a compressor, error feedback and a transport, on a communication
worker that overlaps the exchange with backward.

:class:`CompressionState` holds the options, the per-rank state and the worker;
:func:`average_buffer` averages one buffer synchronously (Horovod, federated) and
:func:`average_bucket` one DDP bucket on the worker.
"""

from commhooks.engine.average import average_bucket, average_buffer, param_views
from commhooks.engine.state import CommStats, CompressionState, HookOptions
from commhooks.engine.worker import HELD, CommWorker

__all__ = [
    "HELD",
    "CommStats",
    "CommWorker",
    "CompressionState",
    "HookOptions",
    "average_bucket",
    "average_buffer",
    "param_views",
]
