"""PowerSGD's warm-start memory: each key's last Q, and the shared draw of a first one.

Owned by :class:`~commhooks.compressors.powersgd.PowerSGD` and read by its exchanges
(:mod:`commhooks.compressors._powersgd_exchange`); neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from commhooks.compressors.base import shared_generator

__all__ = ["WarmStartMemory", "unit_columns"]


def unit_columns(q: Tensor, used: Tensor) -> Tensor:
    """``q`` with unit columns, or ``used`` where ``q`` is non-finite or has a zero column.

    Works on single ``(m, r)`` matrices and ``(batch, m, r)`` stacks alike; the check is a
    ``torch.where``, so no host sync.
    """
    norm = torch.linalg.vector_norm(q, dim=-2, keepdim=True)
    ok = (torch.isfinite(norm) & (norm > 0)).all(dim=-1, keepdim=True)
    return torch.where(ok, q / norm.clamp_min(torch.finfo(q.dtype).tiny), used)


class WarmStartMemory(Mapping[str, Tensor]):
    """Per-key Q, ``(m, r)`` with unit columns, fp32 (fp64 for fp64 gradients).

    A read-only mapping from key to its stored Q; :meth:`start` and :meth:`remember` are the
    only writers.

    Args:
        rank: r, the number of columns of every Q.
        warm_start: whether :meth:`remember` stores anything; without it every step draws a
            fresh Q.
        seed: seed of the shared draw; every rank must pass the same one.
        next_step: per-key call counter (the compressor's), so that without warm start each
            step's draw differs and still agrees across ranks.
    """

    def __init__(
        self, rank: int, warm_start: bool, seed: int, next_step: Callable[[str], int]
    ) -> None:
        self.rank = rank
        self.warm_start = warm_start
        self.seed = seed
        self._next_step = next_step
        self._q: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        return self._q[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._q)

    def __len__(self) -> int:
        return len(self._q)

    def start(self, key: str | None, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The Q that ``key``'s next P = M Q uses: remembered, or a shared random draw."""
        r = self.rank
        step = 0
        if key is not None and self.warm_start:
            q = self._q.get(key)
            if q is not None and q.shape == (m, r):
                return q.to(device=device, dtype=dtype)
        elif key is not None:
            # Without warm start, a new subspace each step (as torch's hook draws); the per-key
            # counter agrees across ranks because every rank compresses each key once per step.
            step = self._next_step(key)
        gen = shared_generator(self.seed, key, step, device)
        return torch.randn((m, r), generator=gen, device=device, dtype=dtype)

    def remember(self, keys: Sequence[str | None], q: Tensor, used: Tensor) -> None:
        """Store each key's new Q (``q[i]``, a ``(batch, m, r)`` stack) for the next step.

        Columns are normalized: only Q's direction matters, because P is orthonormalized, and
        unit columns keep P = M Q on the gradient's own scale however many ranks summed Q
        (torch's hook keeps the raw all-reduced Q, which grows with the world size). A Q that
        is non-finite (a NaN step, which GradScaler skips) or has a zero column (a zero
        gradient, from which power iteration could never recover) is not stored; the key keeps
        the Q it used (``used``).
        """
        if not self.warm_start or all(k is None for k in keys):
            return
        new = unit_columns(q, used)
        for i, k in enumerate(keys):
            if k is not None:
                self._q[k] = new[i]

    def state_dict(self) -> dict[str, Tensor]:
        """Each key's stored Q (a shallow copy)."""
        return dict(self._q)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self._q = dict(state)
