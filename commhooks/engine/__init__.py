"""The averaging engine under every front end: a group of gradient tensors in, their average
over ranks out, through a compressor, error feedback and a transport, on a communication
worker that overlaps the exchange with backward.

:class:`CompressionState` holds the options, the per-rank state and the worker;
:meth:`CompressionState.begin` opens a :class:`Step`, which every front end feeds
(:meth:`Step.submit`) and closes (:meth:`Step.close`); the DDP hook feeds it one bucket at a
time through :func:`average_bucket`.
"""

from commhooks.engine.average import average_bucket, average_flat, param_views
from commhooks.engine.state import CommStats, CompressionState, HookOptions
from commhooks.engine.step import Step, StepReport
from commhooks.engine.worker import HELD, CommWorker

__all__ = [
    "HELD",
    "CommStats",
    "CommWorker",
    "CompressionState",
    "HookOptions",
    "Step",
    "StepReport",
    "average_bucket",
    "average_flat",
    "param_views",
]
