"""The one place that picks a kernel backend for a set of tensors.

Compressors never branch on the device: their fused codecs (:mod:`commhooks.kernels.codec`)
ask :func:`backend_for` for the backend that serves these tensors and this operation, and take
the torch path when the answer is None.

- CPU tensors: the C kernels (:class:`~commhooks.kernels.native_backend.NativeBackend`).
- CUDA tensors: the Triton kernels (:mod:`commhooks.kernels.triton_backend`), when ``triton``
  imports.
- ``COMMHOOKS_KERNELS=torch``: no backend anywhere (the torch reference everywhere).
  ``COMMHOOKS_KERNELS=triton``: the Triton kernels for CPU tensors too, run by Triton's
  interpreter (``TRITON_INTERPRET=1``, set here before the kernels are first imported). It is
  how the device kernels are tested on machines without a GPU; it is far slower than either
  real backend.

Why a plain dispatch module rather than ``torch.library`` custom ops: the codecs are not traced
by ``torch.compile``, their kernels mutate an optional residual in place and return packed
bytes of data-dependent layout, and a custom op's schema and dispatcher would add a per-call
cost to the small tensors of a bucket without buying anything here.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import torch
from torch import Tensor

from commhooks._validate import shown
from commhooks.kernels.backend import Backend

__all__ = ["backend_for", "backend_for_device", "backend_named", "mode", "reset"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, Backend | None] = {}


def mode() -> str:
    """``COMMHOOKS_KERNELS``: ``"auto"`` (default), ``"torch"`` or ``"triton"``."""
    value = os.environ.get("COMMHOOKS_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", "triton"):
        raise ValueError(f"COMMHOOKS_KERNELS={shown(value)}: expected auto, torch or triton")
    return value


def backend_named(name: str) -> Backend | None:
    """The ``"native"`` or ``"triton"`` backend, loaded once; None where it cannot load
    (logged once)."""
    if name in _loaded:  # every call of a step: no lock once loaded
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load(name)
        return _loaded[name]


def _load(name: str) -> Backend | None:
    if name == "native":
        from commhooks.kernels.native_backend import NativeBackend

        return NativeBackend()
    if name == "triton":
        try:
            from commhooks.kernels.triton_backend import TritonBackend
        except ImportError as e:  # no triton: CUDA tensors keep the torch path
            logger.warning("Triton kernels unavailable (%s); CUDA codecs use the torch path", e)
            return None
        return TritonBackend()
    raise ValueError(f"kernel backend {name!r}: expected native or triton")


def _name_for(device_type: str) -> str | None:
    m = mode()
    if m == "torch":
        return None
    if device_type == "cuda" or (m == "triton" and device_type == "cpu"):
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            # Read when triton.language is first imported: too late once anything has.
            if "triton.language" in sys.modules:
                raise RuntimeError(
                    "COMMHOOKS_KERNELS=triton on CPU tensors needs Triton's interpreter, but "
                    "triton was imported without it (Lightning and torch.compile import it); "
                    "set TRITON_INTERPRET=1 before the process starts"
                )
            os.environ["TRITON_INTERPRET"] = "1"
        return "triton"
    return "native" if device_type == "cpu" else None


def backend_for_device(device: torch.device, op: str) -> Backend | None:
    """The backend that runs ``op`` on this kind of device (whatever the tensors), or None."""
    name = _name_for(device.type)
    backend = None if name is None else backend_named(name)
    return backend if backend is not None and op in backend.provides else None


def backend_for(*tensors: Tensor, op: str, numel: int | None = None) -> Backend | None:
    """The backend that runs ``op`` (``"sign"``, ``"uniform"``, ``"stochastic"``, ``"table"``,
    ``"cast"``) on these tensors, all on the first one's device; None: use the torch path."""
    if not tensors:
        return None
    backend = backend_for_device(tensors[0].device, op)
    return backend if backend is not None and backend.usable(*tensors, numel=numel, op=op) else None


def prepare() -> bool:
    """Build and load the CPU kernels now, not inside the first training step or a timed
    probe (once per machine; cheap afterwards); whether they are available."""
    from commhooks import native

    return native.prepare()


def reset() -> None:
    """Forget the loaded backends (tests switch ``COMMHOOKS_KERNELS``)."""
    with _lock:
        _loaded.clear()
