"""Measured fall-back to a dense all-reduce for buckets where compression does not pay.

With ``HookOptions(fallback="auto")`` each bucket (named by its parameters, so DDP's bucket
rebuild after the first step starts a fresh measurement) first alternates between the
compressed path and a dense all-reduce for ``fallback_probes`` calls each, timing both on
every rank. The call after that sums each path's median time over the ranks (one small
all-reduce, at the same point on every rank, since all ranks see the same buckets in the same
order) and settles the bucket for the rest of the run: dense if compression took longer. So
the decision is the same on every rank and rests on this machine's codec and link speed, not
on a model of them.

The dense time is taken with the all-reduce waited on (and the device synchronised on
CUDA), its full cost; settled dense buckets then run DDP's asynchronous all-reduce, which
overlaps with the backward pass, so the choice leans towards compression where the two are
close. The first compressed call may build the native kernels (seconds, once per machine):
:class:`~commhooks.engine.state.CompressionState` builds them up front, when it is created.

A bucket settled dense sends its workers' error-feedback residuals with its first finite dense
step. The compressed reduce-scatter transport's server-side residuals (``transport.server``)
are not sent: they stay, unused, in memory and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from commhooks.comm.collectives import Collectives

__all__ = ["BucketChoice", "Fallback"]

logger = logging.getLogger(__name__)

COMPRESSED = "compressed"
DENSE = "dense"


@dataclass
class BucketChoice:
    """One bucket's measurements and, once settled, its path.

    ``compressed_s`` and ``dense_s`` are this rank's probe times in seconds; ``compressed_ms``
    and ``dense_ms`` the medians averaged over the ranks, which the choice compared.
    """

    params: tuple[str, ...]
    compressed_s: list[float] = field(default_factory=list)
    dense_s: list[float] = field(default_factory=list)
    choice: str | None = None
    compressed_ms: float | None = None
    dense_ms: float | None = None


class Fallback:
    """Per-bucket probe and choice; see the module docstring.

    Args:
        probes: calls timed on each path before a bucket is settled.
    """

    def __init__(self, probes: int) -> None:
        self.probes = probes
        self._buckets: dict[tuple[str, ...], BucketChoice] = {}

    def plan(
        self, params: tuple[str, ...], comm: Collectives, device: torch.device
    ) -> tuple[str, bool]:
        """The path for this call of the bucket, and whether it is a timed probe."""
        b = self._buckets.setdefault(params, BucketChoice(params))
        if b.choice is not None:
            return b.choice, False
        if len(b.compressed_s) >= self.probes and len(b.dense_s) >= self.probes:
            self._settle(b, comm, device)
            assert b.choice is not None
            return b.choice, False
        # Alternate, compressed first; both paths see the same run of steps.
        compressed = len(b.compressed_s) <= len(b.dense_s)
        return (COMPRESSED if compressed else DENSE), True

    def record(self, params: tuple[str, ...], path: str, seconds: float) -> None:
        b = self._buckets[params]
        (b.compressed_s if path == COMPRESSED else b.dense_s).append(seconds)

    def _settle(self, b: BucketChoice, comm: Collectives, device: torch.device) -> None:
        mine = torch.tensor(
            [statistics.median(b.compressed_s), statistics.median(b.dense_s)], dtype=torch.float64
        ).to(device)
        comm.all_reduce(mine)
        compressed, dense = (1e3 * float(v) / comm.world for v in mine.cpu())
        b.compressed_ms, b.dense_ms = compressed, dense
        b.choice = DENSE if compressed > dense else COMPRESSED
        logger.info(
            "bucket of %d tensors (%s, ...): compressed %.2f ms, dense %.2f ms per call -> %s",
            len(b.params), b.params[0] if b.params else "", compressed, dense, b.choice,
        )  # fmt: skip

    def report(self) -> list[BucketChoice]:
        """Every bucket seen, settled or still probing."""
        return list(self._buckets.values())

    def state_dict(self) -> dict[str, Any]:
        """Every bucket's probes and choice, so a resumed job keeps the paths it settled
        rather than probing again (which could settle differently and diverge)."""
        return {"buckets": [dataclasses.asdict(b) for b in self._buckets.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buckets = {}
        for fields_ in state.get("buckets", []):
            b = BucketChoice(**{**fields_, "params": tuple(fields_["params"])})
            self._buckets[b.params] = b
