"""Every built-in compressor: importing this module registers each one by name, and the fused
error-feedback paths that live in modules of their own (:mod:`._shared_scale`) by codec.

``commhooks`` imports it, so the registry knows every name before any lookup. It is kept out of
the package's ``__init__`` on purpose: the registry and error feedback import the codec base
from this package, and the algorithms import them in turn, so an ``__init__`` that loaded the
algorithms would close an import cycle through all of them.
"""

from __future__ import annotations

from commhooks.compressors import (  # noqa: F401
    _shared_scale,
    adaptive,
    cast,
    dgc,
    identity,
    nonuniform,
    pipeline,
    powersgd,
    qsgd,
    randomk,
    sign,
    ternary,
    threshold,
    topk,
    uniform,
)
