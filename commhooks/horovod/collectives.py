"""The transports' collectives over Horovod, so the DDP transports serve Horovod jobs unchanged."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from commhooks.comm.collectives import Collectives
from commhooks.compressors.base import ReduceOp

__all__ = ["HorovodCollectives", "horovod"]


def horovod() -> Any:
    """``horovod.torch``, imported on first use so ``import commhooks`` works without it."""
    try:
        import horovod.torch as hvd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "commhooks.horovod needs Horovod built with PyTorch support; "
            "run scripts/install-horovod.sh (see docs/horovod.md)"
        ) from e
    if not hvd.is_initialized():
        raise RuntimeError("horovod: call hvd.init() before building commhooks' Horovod objects")
    return hvd


class HorovodCollectives(Collectives):
    """Blocking collectives through Horovod's public async ops, in one ``process_set``.

    Every call is ``*_async`` followed by ``synchronize``: the transports issue them one at a
    time, in the same order on every rank, so Horovod's negotiation never sees two ranks
    disagree. Names are an instance number plus a call counter, equal on every rank, so two
    optimizers in one job never collide.

    Horovod has no bfloat16 reduction, so a bf16 all-reduce is carried as an all-gather of
    the 2-byte values, summed locally in fp32: the bytes handed over per rank stay 2 per
    element, but a ring all-gather moves ``n - 1`` blocks where a ring all-reduce moves about
    two, so above 3 ranks it costs more link traffic than fp16.
    """

    #: instances are numbered in construction order, which every rank shares, so names agree
    _instances = itertools.count()

    def __init__(self, process_set: Any = None, prefix: str = "commhooks") -> None:
        hvd = horovod()
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self.world = self.process_set.size()
        self.rank = self.process_set.rank()
        self._prefix = f"{prefix}.{next(self._instances)}"
        self._count = itertools.count()
        self._ops = {ReduceOp.SUM: hvd.Sum, ReduceOp.MAX: hvd.Max}

    def _name(self, what: str) -> str:
        return f"{self._prefix}.{what}.{next(self._count)}"

    def all_reduce(self, buf: Tensor, op: ReduceOp = ReduceOp.SUM) -> None:
        if buf.dtype == torch.bfloat16:
            if op is not ReduceOp.SUM:
                raise ValueError(f"op={op}: bf16 payloads can only be summed over Horovod")
            parts = self.all_gather(buf.reshape(-1).view(torch.int16)).view(torch.bfloat16)
            total = parts.view(self.world, -1).float().sum(0)
            buf.copy_(total.view(buf.shape))
            return
        hvd = self._hvd
        handle = hvd.allreduce_async_(
            buf, name=self._name("allreduce"), op=self._ops[op], process_set=self.process_set
        )
        hvd.synchronize(handle)

    def all_gather(self, own: Tensor) -> Tensor:
        hvd = self._hvd
        handle = hvd.allgather_async(
            own.reshape(-1).contiguous(), name=self._name("allgather"), process_set=self.process_set
        )
        return hvd.synchronize(handle)

    def all_to_all(self, send: Tensor) -> Tensor:
        hvd = self._hvd
        handle = hvd.alltoall_async(
            send.contiguous(), name=self._name("alltoall"), process_set=self.process_set
        )
        out = hvd.synchronize(handle)
        # Horovod returns (tensor, received splits) when splits are given or implied.
        return out[0] if isinstance(out, tuple) else out
