"""Topology-aware averaging: dense inside a node, compressed between nodes.

A multi-node job has two links of very different speed: NVLink or PCIe inside a node, Ethernet
or a shared fabric between nodes. :class:`HierarchicalTransport` sends only what must cross
the slow link, compressed:

1. inside each node, a dense reduce-scatter: local rank ``j`` gets the node's mean of piece
   ``j`` of every tensor (an all-to-all of ``(L-1)/L`` of the group's bytes per rank);
2. across nodes, local rank ``j`` averages its piece with local rank ``j`` of every other node
   through an inner transport (all-reduce, all-gather or reduce-scatter, as for a flat job),
   with error feedback keyed per piece (``"<name>/<j>"``);
3. inside each node again, a dense all-gather of the averaged pieces.

Each rank compresses ``1/L`` of the gradients and the ``L`` ranks of a node use their ``L``
inter-node links side by side, so the bytes crossing between nodes per rank fall ``L``-fold
against a flat compressed exchange, and an all-gather codec's cost grows with the number of
nodes instead of the number of ranks.

Node groups come from the launcher (:func:`local_from_env`: ``LOCAL_WORLD_SIZE`` under
torchrun, ``OMPI_COMM_WORLD_LOCAL_SIZE`` under mpirun, ``HOROVOD_LOCAL_SIZE`` under
horovodrun), from ``ranks_per_node``, or are given as a pair of collectives or process groups.
Ranks are taken to be numbered node by node (rank ``r`` on node ``r // L``), as torchrun,
horovodrun and mpirun's default mapping number them; :func:`node_groups` checks it against
every rank's local rank and refuses other placements.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from commhooks._validate import check_int
from commhooks.comm.collectives import Collectives, TorchCollectives, as_collectives
from commhooks.comm.transport import Transport, TransportStats, count_allreduce, transport_class
from commhooks.compressors.base import Compressor
from commhooks.feedback import ErrorFeedback

__all__ = [
    "TOPOLOGIES",
    "GroupBuilder",
    "HierarchicalTransport",
    "NodeGroups",
    "local_from_env",
    "misplaced",
    "node_groups",
    "node_ranks",
    "placed",
]

#: ``HookOptions.topology``'s choices
TOPOLOGIES = ("auto", "flat", "hierarchical")

#: (local size, local rank) variables each launcher sets, in the order they are looked up
LAUNCHER_ENV = (
    ("LOCAL_WORLD_SIZE", "LOCAL_RANK"),  # torchrun
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # mpirun (Open MPI)
    ("HOROVOD_LOCAL_SIZE", "HOROVOD_LOCAL_RANK"),  # horovodrun
)


@dataclass(frozen=True)
class NodeGroups:
    """The two groups a rank belongs to: ``local`` (the ranks of its node) and ``cross`` (the
    ranks with its local rank on every node)."""

    local: Collectives
    cross: Collectives

    @property
    def layout(self) -> str:
        """``"hierarchical:<nodes>x<ranks per node>"``: what checkpoints and the cross-rank
        check compare."""
        return f"hierarchical:{self.cross.world}x{self.local.world}"


#: ``build(comm, ranks_per_node)``: the two groups of this rank over a backend's own groups
#: (:func:`node_ranks` says which), or None to stay flat
GroupBuilder = Callable[[Collectives, int], NodeGroups | None]


def node_ranks(world: int, size: int) -> list[list[int]]:
    """Every node's ranks, then every cross group's: node ``n`` holds ranks ``n * size`` to
    ``(n + 1) * size - 1``, and cross group ``j`` the ranks with local rank ``j``
    (``j, j + size, ...``). A rank belongs to node ``rank // size`` and cross group
    ``world // size + rank % size``."""
    nodes = [list(range(n, n + size)) for n in range(0, world, size)]
    return nodes + [list(range(j, world, size)) for j in range(size)]


def local_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, str] | None:
    """``(ranks per node, local rank, variable)`` from the launcher's environment, or None
    where no launcher set them."""
    env = os.environ if env is None else env
    for size_var, rank_var in LAUNCHER_ENV:
        if size_var in env:
            try:
                size, rank = int(env[size_var]), int(env.get(rank_var, "0"))
            except ValueError:
                raise ValueError(
                    f"{size_var}={env[size_var]!r}, {rank_var}={env.get(rank_var)!r}: "
                    "must be integers"
                ) from None
            if not 0 <= rank < size:
                raise ValueError(f"{rank_var}={rank}: must be in [0, {size_var}={size})")
            return size, rank, size_var
    return None


def node_groups(
    topology: str,
    comm: Collectives,
    ranks_per_node: int = 0,
    groups: tuple[Any, Any] | None = None,
    placement: Sequence[tuple[int, int]] | None = None,
    *,
    launcher: tuple[int, int, str] | None = None,
    build: GroupBuilder | None = None,
) -> NodeGroups | None:
    """The node groups for ``topology`` over ``comm``, or None for a flat exchange.

    Args:
        topology: ``"flat"``; ``"hierarchical"``; or ``"auto"``: hierarchical where there is
            more than one node and more than one rank per node.
        comm: the whole group. With torch.distributed the node groups are new process groups
            of its ranks, which every rank of it must create at the same point (one small
            all-gather checks where the ranks are).
        ranks_per_node: ranks per node (ranks ``r`` with the same ``r // ranks_per_node``
            share a node); 0 takes it from the launcher (:func:`local_from_env`).
        groups: explicit ``(local, cross)`` collectives or process groups instead.
        placement: every rank's ``(local rank, ranks per node)`` from the launcher, already
            gathered (:func:`commhooks.comm.placement.agree_topology`); then no all-gather
            checks where the ranks are.
        launcher: ``(ranks per node, local rank, source)`` where the backend knows them
            (Horovod's ``hvd.local_size()``), instead of :func:`local_from_env`.
        build: makes the groups over a backend other than torch.distributed (Horovod's
            process sets); by default ``comm`` must be a ``TorchCollectives``.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology={topology!r}: must be one of {', '.join(TOPOLOGIES)}")
    check_int("ranks_per_node", ranks_per_node, lo=0)
    if topology == "flat":
        return None
    if groups is not None:
        local, cross = (as_collectives(g) for g in groups)
        if local.world * cross.world != comm.world:
            raise ValueError(
                f"node_groups: {cross.world} nodes x {local.world} ranks per node does not "
                f"make the {comm.world} ranks of the group"
            )
        return _pick(topology, NodeGroups(local, cross))
    size, source = ranks_per_node, "ranks_per_node"
    found = None if ranks_per_node else launcher if launcher is not None else local_from_env()
    if found is not None:
        size, _, source = found
        if not placed(comm, size, found[1], topology, source, placement):
            return None
    if not size:
        if topology == "auto":
            return None
        raise ValueError(
            "topology='hierarchical': the ranks per node are unknown; start under torchrun "
            "(LOCAL_WORLD_SIZE), mpirun or horovodrun, or give ranks_per_node or node groups"
        )
    if comm.world % size:
        raise ValueError(
            f"topology={topology!r}: the world size {comm.world} is not a multiple of "
            f"{source}={size} (every node must run as many ranks)"
        )
    if topology == "auto" and not 1 < size < comm.world:
        return None
    if build is not None:
        return build(comm, size)
    if not isinstance(comm, TorchCollectives):
        raise ValueError(
            f"topology={topology!r}: node groups over {type(comm).__name__} must be given "
            "explicitly (the Horovod optimizer builds them from its process sets)"
        )
    return _torch_groups(comm, size)


def _pick(topology: str, nodes: NodeGroups) -> NodeGroups | None:
    if topology == "auto" and not (nodes.local.world > 1 and nodes.cross.world > 1):
        return None
    return nodes


def placed(
    comm: Collectives,
    size: int,
    local_rank: int,
    topology: str,
    source: str,
    everyone: Sequence[tuple[int, int]] | None = None,
) -> bool:
    """Whether the ranks sit node by node (see :func:`misplaced`), decided alike on every rank:
    False where they do not and ``topology`` is ``"auto"`` (stay flat).

    Raises:
        RuntimeError: they do not and ``topology`` is ``"hierarchical"``; names the first
            misplaced rank and ``source`` (where the ranks per node came from).
    """
    wrong = misplaced(comm, size, local_rank, everyone)
    if wrong and topology != "auto":
        raise RuntimeError(
            f"topology={topology!r}: {wrong} ({source}), but the hierarchical transport "
            "needs nodes of equal size with ranks numbered node by node (rank r on node "
            "r // ranks per node); launch with torchrun, or mpirun --map-by slot, or pass "
            "the node groups explicitly"
        )
    return not wrong


def misplaced(
    comm: Collectives,
    size: int,
    local_rank: int,
    everyone: Sequence[tuple[int, int]] | None = None,
) -> str:
    """What is wrong with the ranks' placement, the same on every rank (one all-gather of each
    rank's local rank and size, unless ``everyone`` holds them already), or ``""`` where every
    rank ``r`` has local rank ``r % size`` of ``size`` and ``size`` divides the world."""
    if everyone is None:
        mine = torch.tensor([local_rank, size], dtype=torch.int64, device=comm.device)
        everyone = comm.all_gather(mine).view(-1, 2).tolist()
    if comm.world % size:
        return f"the world size {comm.world} is not a multiple of the ranks per node {size}"
    for r, (lr, s) in enumerate(everyone):
        if (lr, s) != (r % size, size):
            return f"rank {r} has local rank {lr} of {s}"
    return ""


def _torch_groups(comm: TorchCollectives, size: int) -> NodeGroups:
    """New process groups: this rank's node, then this rank's peers on the other nodes. Each
    rank creates only the two it belongs to (local synchronization), the node groups first,
    so that no two ranks wait on each other in a cycle."""
    ranks = dist.get_process_group_ranks(comm.group if comm.group is not None else dist.group.WORLD)
    layout = node_ranks(comm.world, size)
    local = [ranks[r] for r in layout[comm.rank // size]]
    cross = [ranks[r] for r in layout[comm.world // size + comm.rank % size]]
    backend = dist.get_backend(comm.group)
    lg = dist.new_group(local, backend=backend, use_local_synchronization=True)
    cg = dist.new_group(cross, backend=backend, use_local_synchronization=True)
    return NodeGroups(TorchCollectives(lg), TorchCollectives(cg))


class HierarchicalTransport(Transport):
    """Dense reduce-scatter inside a node, ``inner`` across nodes on each rank's piece, dense
    all-gather inside the node (see the module's docstring).

    Args:
        compressor: the compressor, used only between nodes.
        feedback: error feedback (keys ``"<name>/<local rank>"``), or None.
        comm: the whole group (its world size and rank).
        local: the ranks of this node (collectives or a process group).
        cross: this rank's peers, one per node, with its local rank.
        inner: the transport class across nodes (default: what ``transport="auto"`` picks).

    Tuning: pieces keep a matrix's rows together when its first dimension is a multiple of the
    ranks per node, so PowerSGD sees ``(rows / L) x cols`` matrices; elsewhere pieces are flat.
    The intra-node steps are dense and uncompressed: where the node's own link is slow too
    (several ranks per node over TCP), a flat compressed exchange may win.
    """

    name = "hierarchical"

    def __init__(
        self,
        compressor: Compressor[Any],
        feedback: ErrorFeedback | None = None,
        comm: Collectives | dist.ProcessGroup | None = None,
        *,
        local: Collectives | dist.ProcessGroup,
        cross: Collectives | dist.ProcessGroup,
        inner: type[Transport] | None = None,
    ) -> None:
        super().__init__(compressor, feedback, comm)
        self.local = as_collectives(local)
        self.cross = as_collectives(cross)
        if self.local.world * self.cross.world != self.world:
            raise ValueError(
                f"local/cross: {self.cross.world} nodes x {self.local.world} ranks per node "
                f"does not make the {self.world} ranks of the group"
            )
        cls = inner if inner is not None else transport_class(compressor)
        if cls is HierarchicalTransport:
            raise ValueError("inner: must be a flat transport (allreduce, allgather, ...)")
        cls.check(compressor)
        #: the transport between nodes, over ``cross``
        self.inner = cls(compressor, feedback, self.cross)

    @property
    def server(self) -> ErrorFeedback | None:
        """The inner reduce-scatter transport's server-side memory, if any."""
        return getattr(self.inner, "server", None)

    carries_ride = True

    @property
    def device_checks(self) -> bool:  # type: ignore[override]
        """As the transport between nodes: the steps inside a node read nothing on the host."""
        return self.inner.device_checks

    def _run(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool,
        stats: TransportStats,
        ride: Tensor | None,
        proceed: Callable[[Tensor], bool] | None,
        out: Sequence[Tensor] | None,
    ) -> list[Tensor] | None:
        """``ride`` is summed inside the node first, then across nodes with the first dtype's
        exchange (in its first summing round over an all-reduce)."""
        if ride is not None:
            t0 = time.perf_counter()
            self.local.all_reduce(ride)
            stats.comm_s += time.perf_counter() - t0
            stats.node_bytes += (
                2 * (self.local.world - 1) / self.local.world * (ride.numel() * ride.element_size())
            )
        means: list[Tensor] = list(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            group = [tensors[i] for i in idx]
            got = self._run_dtype([keys[i] for i in idx], group, memory, stats, ride, proceed)
            if got is None:
                return None
            ride = proceed = None  # summed once, with the first dtype
            for i, m in zip(idx, got):
                means[i] = m
        if ride is not None:  # no tensors: the ride crosses the nodes on its own
            t0 = time.perf_counter()
            self.cross.all_reduce(ride)
            stats.comm_s += time.perf_counter() - t0
            count_allreduce(stats, ride, self.cross.world)
            if proceed is not None and not proceed(ride):
                return None
        return means

    def _run_dtype(
        self,
        keys: list[str],
        tensors: list[Tensor],
        memory: bool,
        stats: TransportStats,
        ride: Tensor | None,
        proceed: Callable[[Tensor], bool] | None,
    ) -> list[Tensor] | None:
        """:meth:`_run` for tensors of one dtype."""
        size, me = self.local.world, self.local.rank
        dtype = tensors[0].dtype
        send, widths = _scatter_layout(tensors, size)
        t0 = time.perf_counter()
        recv = self.local.all_to_all(send.reshape(-1)).view(size, -1)
        stats.comm_s += time.perf_counter() - t0
        stats.node_bytes += (size - 1) / size * send.numel() * send.element_size()
        # Summed in fp32 at least, as the flat all-reduce of a float bucket is, and in rank
        # order, so that the result does not depend on which rank computes it.
        acc = torch.promote_types(dtype, torch.float32)
        mine = recv.sum(0, dtype=acc).div_(size).to(dtype)
        shards = [
            piece.view(_piece_shape(t, size))
            for piece, t in zip(mine.split(widths), tensors, strict=True)
        ]
        means, moved = self.inner.run(
            [f"{k}/{me}" for k in keys], shards, memory=memory, ride=ride, proceed=proceed
        )
        moved.raw_bytes = 0  # counted above, for the whole tensors
        stats.add(moved)
        stats.extra.update(moved.extra)
        if means is None:
            return None
        own = torch.cat([m.reshape(-1).to(dtype) for m in means])
        t0 = time.perf_counter()
        gathered = self.local.all_gather(own).view(size, -1)
        stats.comm_s += time.perf_counter() - t0
        stats.node_bytes += (size - 1) * own.numel() * own.element_size()
        out = []
        for t, block in zip(tensors, gathered.split(widths, dim=1), strict=True):
            out.append(block.reshape(-1)[: t.numel()].view(t.shape))
        return out

    def state_dict(self) -> dict[str, Any]:
        return getattr(self.inner, "state_dict", dict)()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)


def _scatter_layout(tensors: Sequence[Tensor], size: int) -> tuple[Tensor, list[int]]:
    """A ``size x total`` buffer whose row ``j`` holds piece ``j`` of every tensor (each cut
    in ``size`` equal pieces, the last zero-padded), built with one copy; and the widths."""
    widths = [-(-t.numel() // size) for t in tensors]
    send = tensors[0].new_empty(size, sum(widths))
    for t, w, cols in zip(tensors, widths, send.split(widths, dim=1), strict=True):
        if not w:
            continue
        flat, full = t.reshape(-1), t.numel() // w  # rows ``full`` and on need padding
        cols[:full].copy_(flat[: full * w].view(full, w))
        if full < size:
            rest = t.numel() - full * w
            cols[full, :rest].copy_(flat[full * w :])
            cols[full, rest:].zero_()
            cols[full + 1 :].zero_()
    return send, widths


def _piece_shape(t: Tensor, size: int) -> tuple[int, ...]:
    """The shape of one rank's piece of ``t``: whole rows of a matrix whose first dimension
    ``size`` divides (PowerSGD keeps working on matrices), else flat."""
    if t.dim() >= 2 and t.shape[0] % size == 0:
        return (t.shape[0] // size, *t.shape[1:])
    return (-(-t.numel() // size),)
