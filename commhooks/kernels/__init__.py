"""Fused codec kernels behind one dispatch point: C on the CPU, Triton on CUDA devices.

- :mod:`~commhooks.kernels.dispatch`: which backend serves a set of tensors
  (:func:`backend_for`), and the ``COMMHOOKS_KERNELS`` switch.
- :mod:`~commhooks.kernels.codec`: :class:`FusedCodec`, what a compressor attaches to use them.
- :mod:`~commhooks.kernels.native_backend` and :mod:`~commhooks.kernels.triton_backend`: the
  backends, with the same wire layouts as the compressors' torch code (docs/gpu.md).
"""

from __future__ import annotations

from commhooks.kernels.backend import Backend
from commhooks.kernels.codec import FusedCodec
from commhooks.kernels.dispatch import backend_for, backend_for_device, backend_named, mode

__all__ = [
    "Backend",
    "FusedCodec",
    "backend_for",
    "backend_for_device",
    "backend_named",
    "mode",
]
