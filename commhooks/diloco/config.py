"""DiLoCo's options, its stats and the split of the parameters into fragments."""

from __future__ import annotations

from dataclasses import dataclass, field

from commhooks._validate import check_choice, check_int, check_real
from commhooks.comm.hierarchical import TOPOLOGIES
from commhooks.engine.state import CommStats

__all__ = [
    "OUTER_LR",
    "OUTER_MOMENTUM",
    "DiLoCoConfig",
    "DiLoCoStats",
    "FragmentStats",
    "split_fragments",
]

#: the default outer step: Nesterov SGD with this learning rate and momentum. Measured on the
#: byte-level transformer benchmark (docs/diloco.md; H = 30, 2 replicas, 300 AdamW steps, 3
#: seeds): 1.012x DDP's validation loss, against 1.018x for plain averaging (lr 1, no
#: momentum) and 1.031x for the papers' lr 0.7 / momentum 0.9, which is tuned for H = 500
OUTER_LR = 1.0
OUTER_MOMENTUM = 0.5


@dataclass(frozen=True)
class DiLoCoConfig:
    """When replicas sync.

    Args:
        sync_every: H, inner steps per round. Larger H: H-fold fewer bytes, more drift
            between replicas; 10-100 works with AdamW here (see docs/diloco.md).
        fragments: split the parameters into this many fragments, synced in turn, one every
            ``sync_every / fragments`` steps: the peak bytes per sync fall by this factor.
        delay: τ, inner steps between a fragment's exchange starting and its result being
            applied; the exchange runs on the communication worker meanwhile. Below
            ``sync_every / fragments``. 1-2 hides a slow link's latency.
        mix: alpha: when a fragment lands, its local weights become
            ``mix * local + (1 - mix) * global``
            (0: the global weights, as in DiLoCo). In [0, 1).
        topology: as in :class:`commhooks.engine.HookOptions`.
    """

    sync_every: int = 30
    fragments: int = 1
    delay: int = 0
    mix: float = 0.0
    topology: str = "auto"

    def __post_init__(self) -> None:
        check_int("sync_every", self.sync_every, lo=1)
        check_int("fragments", self.fragments, lo=1)
        if self.fragments > self.sync_every:
            raise ValueError(
                f"fragments={self.fragments}: more fragments than sync_every="
                f"{self.sync_every} steps; each fragment syncs once per sync_every steps"
            )
        check_int("delay", self.delay, lo=0)
        gap = min(b - a for a, b in zip([0, *self.landings()], self.landings()))
        if self.delay * self.fragments >= self.sync_every or self.delay >= gap:
            raise ValueError(
                f"delay={self.delay}: must be below sync_every / fragments = "
                f"{self.sync_every / self.fragments:g} (and below {gap}, the fewest steps "
                "between two fragments' syncs): an exchange must land before the next starts"
            )
        check_real("mix", self.mix, 0.0, 1.0, hi_open=True)
        check_choice("topology", self.topology, TOPOLOGIES)

    def landings(self) -> list[int]:
        """The inner step (1 to H) within each round at which each fragment is applied."""
        return [(f + 1) * self.sync_every // self.fragments for f in range(self.fragments)]


@dataclass
class FragmentStats:
    """One fragment's syncs (``skipped``: those some replica's non-finite values skipped) and
    bytes; ``peak_wire_bytes`` is the most one of its syncs handed over."""

    syncs: int = 0
    skipped: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    peak_wire_bytes: int = 0


@dataclass
class DiLoCoStats(CommStats):
    """:class:`CommStats` of this rank's syncs (``steps`` counts them too;
    ``nonfinite_steps`` counts those skipped), plus the inner steps taken, the most bytes one
    sync handed over, and the same per fragment."""

    syncs: int = 0
    inner_steps: int = 0
    peak_wire_bytes: int = 0
    fragments: list[FragmentStats] = field(default_factory=list)


def split_fragments(sizes: list[int], fragments: int) -> list[list[int]]:
    """Parameter indices per fragment: in model order, each parameter goes to the fragment
    with the fewest elements so far. Alike layers are thereby strided over the fragments
    (layer i in fragment i mod N), and the fragments' bytes are balanced."""
    if fragments > len(sizes):
        raise ValueError(
            f"fragments={fragments}: more fragments than the model's {len(sizes)} trainable "
            "parameters"
        )
    load = [0] * fragments
    out: list[list[int]] = [[] for _ in range(fragments)]
    for i, n in enumerate(sizes):
        f = min(range(fragments), key=lambda k: (load[k], k))
        out[f].append(i)
        load[f] += n
    return out
