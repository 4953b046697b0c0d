"""Seeded splits of a dataset among clients (ranks), identical on every rank.

Each function returns one index tensor per client. They need only the dataset's length or its
labels, so they work for any map-style dataset: wrap with ``torch.utils.data.Subset``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from commhooks._validate import check_int, check_real

__all__ = ["dirichlet_split", "iid_split", "load_digits", "shard_split"]


def iid_split(n: int, clients: int, seed: int = 0) -> list[Tensor]:
    """A random permutation of ``range(n)`` cut into ``clients`` near-equal parts."""
    check_int("n", n, lo=0)
    check_int("clients", clients, lo=1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(perm.tensor_split(clients))


def dirichlet_split(
    labels: Sequence[int] | Tensor, clients: int, alpha: float, seed: int = 0
) -> list[Tensor]:
    """Label skew: each class is shared among clients in Dirichlet(``alpha``) proportions.

    Args:
        labels: one integer label per example.
        clients: number of parts.
        alpha: concentration; small values (0.1-0.5) give each client a few dominant classes,
            large ones (100) approach an IID split.
        seed: the same seed gives the same split on every rank.

    Every client gets at least one example (taken from the largest part if need be), so that
    every rank can draw batches.
    """
    check_int("clients", clients, lo=1)
    check_real("alpha", alpha, lo=0.0, lo_open=True)
    y = torch.as_tensor(labels).reshape(-1).cpu().numpy()
    if y.size < clients:
        raise ValueError(f"labels: {y.size} examples cannot give each of {clients} clients one")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        share = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(share)[:-1] * idx.size).astype(int)
        for c, piece in enumerate(np.split(idx, cuts)):
            parts[c].extend(piece.tolist())
    for c in range(clients):
        if not parts[c]:
            donor = max(range(clients), key=lambda d: len(parts[d]))
            parts[c].append(parts[donor].pop())
    return [torch.tensor(sorted(p), dtype=torch.int64) for p in parts]


def shard_split(
    labels: Sequence[int] | Tensor, clients: int, shards_per_client: int = 2, seed: int = 0
) -> list[Tensor]:
    """Pathological label skew (McMahan et al.): sort by label, cut into
    ``clients * shards_per_client`` equal shards, and deal each client ``shards_per_client``
    of them at random; with 2 shards a client sees about two classes.
    """
    check_int("clients", clients, lo=1)
    check_int("shards_per_client", shards_per_client, lo=1)
    y = torch.as_tensor(labels).reshape(-1).cpu()
    n_shards = clients * shards_per_client
    if y.numel() < n_shards:
        raise ValueError(f"labels: {y.numel()} examples cannot fill {n_shards} shards")
    g = torch.Generator().manual_seed(seed)
    # Ties broken at random, so equal labels do not always go in index order.
    order = torch.randperm(y.numel(), generator=g)
    order = order[torch.sort(y[order], stable=True).indices]
    shards = order.tensor_split(n_shards)
    deal = torch.randperm(n_shards, generator=g).view(clients, shards_per_client)
    return [torch.sort(torch.cat([shards[i] for i in row.tolist()])).values for row in deal]


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scikit-learn's bundled digits (no download) as ``(x_train, y_train, x_test, y_test)``:
    8x8 images flattened to 64 features in [0, 1], a seeded train/test cut."""
    check_real("test_fraction", test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    table = torch.from_numpy(_digits_table())
    x = table[:, :-1].to(torch.float32) / 16.0
    y = table[:, -1].to(torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int((1 - test_fraction) * len(y))
    tr, te = perm[:cut], perm[cut:]
    return x[tr], y[tr], x[te], y[te]


def _digits_table(roots: Sequence[str] | None = None) -> np.ndarray:
    """Scikit-learn's ``digits.csv.gz`` as one array: 64 pixel columns, then the label.

    Read from where the installed scikit-learn keeps it, without importing scikit-learn: its
    import costs about 1 s of CPU in every process that loads the data on a 2-core machine.
    Falls back to ``sklearn.datasets.load_digits`` where the file is elsewhere.

    Args:
        roots: the folders to look in (default: scikit-learn's package folder).
    """
    if roots is None:
        spec = importlib.util.find_spec("sklearn")  # a top-level package: found, not imported
        roots = (spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return np.loadtxt(f, delimiter=",")
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    return np.column_stack([data.data, data.target])
