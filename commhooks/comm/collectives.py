"""The few collectives transports need, over torch.distributed or another runtime (Horovod).

Transports call only these, always from the calling thread and in an order that every rank
shares, so one transport implementation serves every front end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from commhooks.compressors.base import ReduceOp

__all__ = ["Collectives", "TorchCollectives", "as_collectives"]


class Collectives(ABC):
    """Blocking collectives over a fixed group of ``world`` ranks; this one is ``rank``."""

    world: int
    rank: int

    @abstractmethod
    def all_reduce(self, buf: Tensor, op: ReduceOp = ReduceOp.SUM) -> None:
        """Reduce ``buf`` over ranks, in place."""

    @abstractmethod
    def all_gather(self, own: Tensor) -> Tensor:
        """Every rank's 1-D ``own`` (equal sizes), concatenated in rank order."""

    @abstractmethod
    def all_to_all(self, send: Tensor) -> Tensor:
        """``send`` cut into ``world`` equal blocks; block j goes to rank j. Returns what each
        rank sent this one, in rank order."""


class TorchCollectives(Collectives):
    """torch.distributed over ``group`` (None: the default group)."""

    _OPS: ClassVar[dict[ReduceOp, Any]] = {
        ReduceOp.SUM: dist.ReduceOp.SUM,
        ReduceOp.MAX: dist.ReduceOp.MAX,
    }

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("process group: call torch.distributed.init_process_group first")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, buf: Tensor, op: ReduceOp = ReduceOp.SUM) -> None:
        dist.all_reduce(buf, op=self._OPS[op], group=self.group)

    def all_gather(self, own: Tensor) -> Tensor:
        out = torch.empty(self.world * own.numel(), dtype=own.dtype, device=own.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, own.contiguous(), group=self.group)
        return out

    def all_to_all(self, send: Tensor) -> Tensor:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv


def as_collectives(comm: Collectives | dist.ProcessGroup | None) -> Collectives:
    """``comm`` itself, or torch.distributed over the given process group."""
    return comm if isinstance(comm, Collectives) else TorchCollectives(comm)
