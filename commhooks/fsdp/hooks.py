"""The two places FSDP2 hands gradients over: the all-reduce hook (hierarchical mode) and a
custom reduce-scatter (reduce-scatter mode). Both average through
:meth:`FSDPCompression.exchange`, i.e. the engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # torch's only home

from commhooks.fsdp.state import FSDPCompression
from commhooks.fsdp.units import Unit

__all__ = ["CompressedReduceScatter", "all_reduce_hook"]


def all_reduce_hook(owner: FSDPCompression, unit: Unit) -> Callable[[Tensor], None]:
    """The hook for ``unit.module.set_all_reduce_hook``: FSDP2 calls it with this rank's
    shard of the unit's gradients, already averaged over the node by its reduce-scatter; it
    replaces the shard, in place, by its average over the nodes (error feedback per shard)."""

    def hook(reduce_output: Tensor) -> None:
        if reduce_output.numel() != unit.shard_numel:
            raise RuntimeError(
                f"commhooks.fsdp: unit {unit.name!r} handed {reduce_output.numel()} gradient "
                f"elements, expected {unit.shard_numel}"
            )
        views = [
            piece.view(shape)
            for piece, (_, shape) in zip(reduce_output.split(unit.numels), unit.params)
        ]
        for view, mean in zip(views, owner.exchange(unit, views)):
            view.copy_(mean)

    return hook


class CompressedReduceScatter(ReduceScatter):
    """A ``ReduceScatter`` for ``set_custom_reduce_scatter``: each parameter's chunks go
    through the engine's scatter (:meth:`Step.submit` with ``scatter=True``) and this rank
    gets its chunk of the average.

    Over the ``"reducescatter"`` transport (what ``"auto"`` takes for static-size,
    single-round codecs) every destination's chunk is compressed once, sent in one
    all-to-all, decoded and summed in fp32 by its owner; nothing else crosses. Error feedback,
    where the codec needs it, keeps a residual of each parameter's whole (padded) gradient on
    every rank. Over ``"allreduce"`` (PowerSGD) or ``"allgather"`` (codecs whose size depends
    on the data) the engine averages whole gradients and keeps the chunk.
    """

    def __init__(self, owner: FSDPCompression, unit: Unit) -> None:
        self.owner = owner
        self.unit = unit

    def allocate(
        self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        op: object,
        async_op: bool = False,
    ) -> None:
        world = group.size()
        numels = self.unit.numels
        if input_tensor.numel() != world * sum(numels):
            raise RuntimeError(
                f"commhooks.fsdp: unit {self.unit.name!r} handed {input_tensor.numel()} gradient "
                f"elements, expected {world * sum(numels)}"
            )
        rows = input_tensor.view(world, -1)
        # Row j holds chunk j of every parameter: each parameter's gradient is its column
        # block, chunks stacked (dim 0 padded to a multiple of the world, as FSDP2 pads), so
        # chunk j of the gradient is row j of its flat view, which is what the scatter keeps.
        whole = [
            cols.reshape(world * shape[0], *shape[1:]) if len(shape) else cols.reshape(-1)
            for cols, (_, shape) in zip(rows.split(numels, dim=1), self.unit.params)
        ]
        chunks = self.owner.exchange(self.unit, whole, scatter=True)
        torch.cat(chunks, out=output_tensor)
        if op == dist.ReduceOp.SUM:
            # FSDP2 divides after a sum (fp16 reduce dtype, force_sum_reduction_for_comms).
            output_tensor.mul_(world)
        elif op != dist.ReduceOp.AVG:
            raise RuntimeError(f"commhooks.fsdp: reduce op {op} is neither SUM nor AVG")
