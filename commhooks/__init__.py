"""commhooks: gradient compression with error feedback for PyTorch DDP and Horovod."""

from commhooks import compressors as compressors
from commhooks.compressors import catalog as _catalog  # noqa: F401  (registers every compressor)
from commhooks.feedback import ErrorFeedback, FeedbackConfig
from commhooks.registry import available, compressor, parse_spec

__all__ = [
    "ErrorFeedback",
    "FeedbackConfig",
    "available",
    "compressor",
    "compressors",
    "parse_spec",
]
