"""Meshes and node groups for FSDP2 with compression: :func:`node_mesh` builds the intra-node
mesh to ``fully_shard`` over (custom HSDP), :func:`resolve` decides the mode from the mesh a
model was sharded over. Node placement comes from :mod:`commhooks.comm.hierarchical`."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from commhooks.comm.collectives import TorchCollectives
from commhooks.comm.hierarchical import NodeGroups, misplaced, node_groups

__all__ = ["HIERARCHICAL", "REDUCE_SCATTER", "Layout", "node_mesh", "resolve"]

#: the all-reduce hook compresses each rank's shard across nodes (custom HSDP)
HIERARCHICAL = "hierarchical"
#: a custom reduce-scatter compresses each destination's chunk (1-D FSDP over every rank)
REDUCE_SCATTER = "reducescatter"


@dataclass(frozen=True)
class Layout:
    """The mode and the groups it runs over. ``nodes``: the hierarchical mode's node groups
    (``local``: the mesh's ranks; ``cross``: this rank's peers with the same shard on the
    other nodes), None in the reduce-scatter mode."""

    mode: str
    world: int
    shards: int
    nodes: NodeGroups | None

    @property
    def name(self) -> str:
        """``"hierarchical:<nodes>x<ranks per node>"`` or ``"reducescatter:<ranks>"``: what a
        checkpoint is checked against."""
        if self.mode == HIERARCHICAL:
            return f"{HIERARCHICAL}:{self.world // self.shards}x{self.shards}"
        return f"{REDUCE_SCATTER}:{self.world}"


def node_mesh(device_type: str = "cpu", ranks_per_node: int = 0) -> DeviceMesh:
    """A 1-D mesh over the ranks of this rank's node, to ``fully_shard`` each module over
    (custom HSDP): FSDP2 then reduce-scatters inside the node and
    :func:`commhooks.fsdp.register` exchanges each rank's compressed shard across nodes.

    Args:
        device_type: the mesh's device type (``"cpu"``, ``"cuda"``).
        ranks_per_node: ranks per node, numbered node by node; 0 (the default) reads it from
            the launcher (``LOCAL_WORLD_SIZE`` under torchrun, ``OMPI_COMM_WORLD_LOCAL_SIZE``
            under mpirun). Every rank must call this at the same point: it creates process
            groups.
    """
    nodes = node_groups(HIERARCHICAL, TorchCollectives(None), ranks_per_node)
    assert nodes is not None and isinstance(nodes.local, TorchCollectives)
    return DeviceMesh.from_group(nodes.local.group, device_type, mesh_dim_names=("shard",))


def resolve(mesh: DeviceMesh, topology: str, ranks_per_node: int) -> Layout:
    """The mode for a model sharded over ``mesh`` (see :func:`commhooks.fsdp.register`).

    ``topology="auto"``: reduce-scatter where the mesh spans every rank, hierarchical where it
    spans one node's. Every rank decides alike: a misplaced mesh raises on every rank, after
    one small all-gather.
    """
    world, shards = dist.get_world_size(), mesh.size()
    spans_all = shards == world
    if topology == "flat" and not spans_all:
        raise ValueError(
            f"topology='flat': the model is sharded over {shards} of {world} ranks; the "
            "reduce-scatter mode needs a mesh over every rank (or topology='hierarchical')"
        )
    if topology == "hierarchical" and spans_all:
        raise ValueError(
            f"topology='hierarchical': the model is sharded over all {world} ranks; shard it "
            "over the ranks of a node (commhooks.fsdp.node_mesh()) for the hierarchical mode"
        )
    if ranks_per_node and not spans_all and ranks_per_node != shards:
        raise ValueError(
            f"ranks_per_node={ranks_per_node}: the model is sharded over meshes of {shards} "
            "ranks, which are the nodes here; leave ranks_per_node at 0 or make them agree"
        )
    if spans_all:
        return Layout(REDUCE_SCATTER, world, shards, None)
    whole = TorchCollectives(None)
    wrong = misplaced(whole, shards, mesh.get_local_rank())
    if wrong:
        raise ValueError(
            f"mesh: {wrong}; the hierarchical mode needs each mesh to be one node's ranks, "
            "numbered node by node (commhooks.fsdp.node_mesh() builds such a mesh)"
        )
    nodes = node_groups(HIERARCHICAL, whole, shards)
    return Layout(HIERARCHICAL, world, shards, nodes)
