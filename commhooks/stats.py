"""The stats every front end reports: what a state's steps moved, cumulative and for the
last step (a leaf module: the engine and :mod:`commhooks.metrics` both import it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from commhooks.comm.transport import Traffic

__all__ = ["CommStats", "StatsCallback"]


@dataclass
class CommStats(Traffic):
    """Bytes and time of this rank's communication.

    ``raw_bytes``: what an uncompressed all-reduce of the same buckets would have been handed.
    ``wire_bytes``: what this rank actually handed to collectives. ``link_bytes``: estimated
    bytes this rank puts on its link for the collective algorithms used (ring all-reduce sends
    ``2(n-1)/n`` of its buffer, a ring all-gather ``n-1`` payloads). ``compress_s``,
    ``comm_s``, ``decompress_s``: seconds spent. All cumulative; the ``last_*`` fields hold the
    last completed step. ``nonfinite_steps`` counts steps on which some rank had inf/nan
    gradients: the optimizer or GradScaler skips them, and their error-feedback and
    compressor-state changes are rolled back.
    :mod:`commhooks.metrics` logs these and writes them to TensorBoard.
    """

    steps: int = 0
    last_raw_bytes: int = 0
    last_wire_bytes: int = 0
    last_link_bytes: float = 0.0
    last_compress_s: float = 0.0
    last_comm_s: float = 0.0
    last_decompress_s: float = 0.0
    nonfinite_steps: int = 0

    @property
    def ratio(self) -> float:
        """Compression ratio so far: raw bytes / wire bytes (dense ``start_iter`` steps count
        at 1x)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0

    @property
    def last_ratio(self) -> float:
        """Compression ratio of the last completed step alone."""
        return self.last_raw_bytes / self.last_wire_bytes if self.last_wire_bytes else 1.0


#: called with the state and a copy of its stats after every step
StatsCallback = Callable[[Any, CommStats], None]
