"""Topology agreement: before any collective that depends on the topology, every rank learns
every rank's topology settings and launcher placement in one small all-gather, and where they
differ every rank raises the same error.

Ranks that resolved their topology on their own could issue different first collectives (one
rank gathering local ranks for the hierarchical transport while another compares configs)
and read each other's data as their own. Gathering settings and placement together, first,
keeps every rank on one path: either all go on with the same placement, or all raise.
"""

from __future__ import annotations

import os

import torch

from commhooks.comm.collectives import Collectives
from commhooks.comm.hierarchical import LAUNCHER_ENV, TOPOLOGIES, local_from_env

__all__ = ["agree_topology"]

# Per rank: topology (index in TOPOLOGIES), ranks_per_node, node groups given (0/1), and, where
# the launcher's ranks per node are used, the variable (index in LAUNCHER_ENV, -1: none), its
# size (-1: unreadable) and this rank's local rank.
_FIELDS = 6


def agree_topology(
    comm: Collectives, topology: str, ranks_per_node: int, explicit: bool
) -> list[tuple[int, int]]:
    """Every rank's ``(local rank, ranks per node)`` from the launcher, in rank order
    (``(0, 0)`` where it is not used), after checking that every rank resolves its topology
    from the same settings.

    Args:
        comm: the whole group; every rank of it must call this at the same point.
        topology: this rank's ``HookOptions.topology``.
        ranks_per_node: this rank's ``HookOptions.ranks_per_node``.
        explicit: whether this rank was given its node groups.

    Raises:
        RuntimeError: the same on every rank, naming each rank's settings, where ranks differ
            in topology, ranks_per_node, given node groups, or (where they read it) the
            launcher's ranks per node; or where a rank's launcher variables are unreadable.
    """
    mine = [TOPOLOGIES.index(topology), ranks_per_node, int(explicit), -1, 0, 0]
    if topology != "flat" and not ranks_per_node and not explicit:
        try:
            found = local_from_env()
        except ValueError:  # every rank raises below, naming the variable
            found = (-1, 0, next(v for v, _ in LAUNCHER_ENV if v in os.environ))
        if found is not None:
            size, local_rank, var = found
            names = [v for v, _ in LAUNCHER_ENV]
            mine[3:] = [names.index(var), size, local_rank]
    own = torch.tensor(mine, dtype=torch.int64, device=comm.device)
    everyone = comm.all_gather(own).view(-1, _FIELDS).tolist()
    settings = [_describe(row) for row in everyone]
    if len(set(settings)) > 1 or any(row[3] >= 0 and row[4] < 0 for row in everyone):
        by: dict[str, list[int]] = {}
        for r, text in enumerate(settings):
            by.setdefault(text, []).append(r)
        groups = "; ".join(f"rank(s) {ranks}: {text}" for text, ranks in by.items())
        raise RuntimeError(
            f"commhooks: ranks disagree on topology ({groups}); every rank must use the same "
            "topology, ranks_per_node and node groups, with the launcher's ranks per node set "
            "alike on every node"
        )
    return [(row[5], row[4]) if row[3] >= 0 else (0, 0) for row in everyone]


def _describe(row: list[int]) -> str:
    """A rank's settings as its gathered row says, without its local rank."""
    topology, per_node, explicit, var, size, _ = row
    text = f"topology={TOPOLOGIES[topology]!r}"
    if per_node:
        text += f", ranks_per_node={per_node}"
    if explicit:
        text += ", node groups given"
    if TOPOLOGIES[topology] != "flat" and not per_node and not explicit:
        name = LAUNCHER_ENV[var][0] if var >= 0 else ""
        if var < 0:
            text += ", no launcher ranks per node"
        elif size < 0:
            text += f", an unreadable {name}"
        elif TOPOLOGIES[topology] == "auto":
            # Nodes of different sizes are no disagreement: "auto" then stays flat.
            text += f", {name} set"
        else:
            text += f", {name}={size}"
    return text
