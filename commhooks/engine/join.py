"""Every rank of a group confirms, through the process group's store, that it runs the hook.

A rank that runs plain DDP (or another hook) never issues the engine's collectives: without
this check, the ranks that do would wait in their first collective until the process group's
timeout (30 minutes on gloo) and then fail with a receive timeout that never names the cause.
Each state announces itself when it is registered, and again on its first bucket; before its
first collective it waits, at most ``join_timeout_s``, for every other rank's announcement and
otherwise raises naming the ranks that are missing.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist

__all__ = ["Join"]

#: per group of ranks, how many states this process has announced for it: ranks that build
#: their states in the same order (which the engine needs anyway) get the same numbers
_COUNTERS: defaultdict[tuple[int, ...], Iterator[int]] = defaultdict(itertools.count)


def _store() -> Any:
    """The default process group's store, or None where this torch does not expose it."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    return get() if get is not None else None


class Join:
    """One state's announcement to, and wait for, the other ranks of ``ranks``.

    Args:
        ranks: global ranks of the group the state communicates over (this rank among them).
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = tuple(ranks)
        group = hashlib.blake2b(repr(self.ranks).encode(), digest_size=6).hexdigest()
        self._prefix = f"commhooks/join/{group}/{next(_COUNTERS[self.ranks])}"
        self._store = _store()
        self._announced = False
        self._joined = False

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    def announce(self) -> None:
        """Tell the other ranks this one runs the hook (once; idempotent)."""
        if self._store is not None and not self._announced:
            self._store.set(self._key(dist.get_rank()), "1")
            self._announced = True

    def wait(self, timeout_s: float) -> None:
        """Return once every rank of the group has announced itself (the first call waits;
        later ones return at once).

        Raises:
            RuntimeError: naming the ranks that did not announce within ``timeout_s``.
        """
        if self._joined or self._store is None:
            return
        self.announce()
        keys = [self._key(r) for r in self.ranks]
        try:
            self._store.wait(keys, datetime.timedelta(seconds=timeout_s))
        except RuntimeError as e:  # the store's timeout (DistStoreError is one)
            missing = [r for r in self.ranks if not self._store.check([self._key(r)])]
            raise RuntimeError(
                f"commhooks: rank(s) {missing} of the group {list(self.ranks)} did not register "
                f"the compression hook within join_timeout_s={timeout_s:g} s of rank "
                f"{dist.get_rank()}'s first bucket. Every rank must register the same hook "
                "(a rank that runs plain DDP or another hook never joins the compressed "
                "exchange); raise join_timeout_s if ranks reach their first backward further "
                "apart than that"
            ) from e
        self._joined = True
