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
    """A ``ReduceScatter`` for ``set_custom_reduce_scatter`` that averages each parameter's
    whole (padded) gradient through the engine (compressed, with error feedback of the
    unsharded gradient where the codec needs it) and keeps this rank's chunk.

    The engine's transport decides what crosses the wire (see :func:`commhooks.fsdp.register`
    for ``"auto"``): ``"allreduce"`` for summable codecs (casts, random-k, PowerSGD),
    ``"allgather"``, or ``"reducescatter"`` (each destination's chunk compressed and sent in
    one all-to-all, decoded and summed in fp32, then re-compressed for the all-gather the
    engine's whole-tensor average needs).
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
        world, rank = group.size(), group.rank()
        numels = self.unit.numels
        if input_tensor.numel() != world * sum(numels):
            raise RuntimeError(
                f"commhooks.fsdp: unit {self.unit.name!r} handed {input_tensor.numel()} gradient "
                f"elements, expected {world * sum(numels)}"
            )
        rows = input_tensor.view(world, -1)
        # Row j holds chunk j of every parameter: each parameter's gradient is its column
        # block, chunks stacked (dim 0 padded to a multiple of the world, as FSDP2 pads).
        whole = [
            cols.reshape(world * shape[0], *shape[1:]) if len(shape) else cols.reshape(-1)
            for cols, (_, shape) in zip(rows.split(numels, dim=1), self.unit.params)
        ]
        means = self.owner.exchange(self.unit, whole)
        torch.cat([m.reshape(world, -1)[rank] for m in means], out=output_tensor)
        if op == dist.ReduceOp.SUM:
            # FSDP2 divides after a sum (fp16 reduce dtype, force_sum_reduction_for_comms).
            output_tensor.mul_(world)
        elif op != dist.ReduceOp.AVG:
            raise RuntimeError(f"commhooks.fsdp: reduce op {op} is neither SUM nor AVG")
