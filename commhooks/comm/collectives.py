"""The few collectives transports need, over torch.distributed or another runtime (Horovod).

Transports call only these, always from the calling thread and in an order that every rank
shares, so one transport implementation serves every front end.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from commhooks.compressors.base import ReduceOp

__all__ = ["Collectives", "TorchCollectives", "as_collectives"]

#: a gloo all-gather of at least twice this many bytes per rank goes in pieces of at least
#: this size ...
PIECE_BYTES = 1 << 20
#: ... and at most this many (see :meth:`TorchCollectives._pieces`)
MAX_PIECES = 8


class Collectives(ABC):
    """Blocking collectives over a fixed group of ``world`` ranks; this one is ``rank``."""

    world: int
    rank: int

    @property
    def device(self) -> torch.device:
        """Where small control tensors (checks, placement) go for these collectives."""
        return torch.device("cpu")

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

    @property
    def device(self) -> torch.device:
        """The current CUDA device where the group's backend has no CPU collectives (NCCL),
        else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, buf: Tensor, op: ReduceOp = ReduceOp.SUM) -> None:
        dist.all_reduce(buf, op=self._OPS[op], group=self.group)

    def all_gather(self, own: Tensor) -> Tensor:
        own = own.reshape(-1)
        out = torch.empty(self.world * own.numel(), dtype=own.dtype, device=own.device)
        pieces = self._pieces(own)
        if pieces == 1:
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(out, own, group=self.group)
            return out
        # Piece i of every rank lands in that rank's block of ``out``: the output views are
        # rank-major slices, so no reordering copy is needed afterwards.
        blocks = out.view(self.world, own.numel())
        works = [
            dist.all_gather(list(blocks[:, piece].unbind(0)), own[piece], group=self.group,
                            async_op=True)
            for piece in _slices(own.numel(), pieces)
        ]  # fmt: skip
        for w in works:
            w.wait()
        return out

    def _pieces(self, own: Tensor) -> int:
        """How many all-gathers to cut ``own`` into: several only for large buffers on gloo.

        gloo runs one collective over one TCP connection per peer, and the process group's
        threads (two by default) run collectives side by side on connections of their own, so
        pieces in flight together keep a shaped link busy where one long message stalls.
        Measured side by side in the benchmarks' network namespaces, 2 ranks over 100 Mbit/s,
        min / median: one 8.4 MB all-gather 0.71 / 1.00 s, in 8 pieces 0.69 / 0.72 s, the
        all-reduce of as many bytes 0.68 / 0.70 s. Unshaped, 8 pieces cost nothing (2 ranks:
        10 / 16 ms either way; 4 ranks: 65 / 72 ms whole, 53 / 66 ms in pieces) while 32 cost
        30-40 ms, hence few pieces of at least a MiB.
        """
        gloo = "gloo" in str(dist.get_backend(self.group))  # "gloo", or "cpu:gloo,cuda:nccl"
        if self.world < 2 or own.device.type != "cpu" or not gloo:
            return 1
        return max(1, min(MAX_PIECES, own.numel() * own.element_size() // PIECE_BYTES))

    def all_to_all(self, send: Tensor) -> Tensor:
        # Not in pieces: gloo's all-to-all takes contiguous buffers only, so pieces cost a copy
        # in and out, and measured slower unshaped (8.4 MB blocks, 4 ranks: 69 ms against 36,
        # median of 10) for a gain only at 2 ranks over 100 Mbit/s (0.71 s against 1.10 s).
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv


def _slices(n: int, pieces: int) -> list[slice]:
    """``pieces`` consecutive slices covering ``range(n)``, sizes differing by at most one."""
    cuts = [n * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(cuts)]


def as_collectives(comm: Collectives | dist.ProcessGroup | None) -> Collectives:
    """``comm`` itself, or torch.distributed over the given process group."""
    return comm if isinstance(comm, Collectives) else TorchCollectives(comm)
