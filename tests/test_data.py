"""Client splits: seeded, disjoint, covering, skewed as asked."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from commhooks.data import _digits_table, dirichlet_split, iid_split, load_digits


def _labels(n: int = 2000, classes: int = 10) -> torch.Tensor:
    return torch.arange(n) % classes


def test_dirichlet_split_is_a_seeded_partition() -> None:
    y = _labels()
    parts = dirichlet_split(y, 4, alpha=0.5, seed=3)
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(len(y)))
    again = dirichlet_split(y, 4, alpha=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_split(y, 4, alpha=0.5, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    y = _labels()

    def top_class_share(alpha: float) -> float:
        shares = [torch.bincount(y[p], minlength=10).max() / len(p) for p in
                  dirichlet_split(y, 4, alpha, seed=0)]  # fmt: skip
        return float(torch.stack(shares).mean())

    assert top_class_share(0.1) > 0.4
    assert top_class_share(1000.0) < 0.15


def test_every_client_gets_an_example() -> None:
    parts = dirichlet_split(_labels(40, 2), 8, alpha=0.01, seed=0)
    assert all(len(p) >= 1 for p in parts) and sum(len(p) for p in parts) == 40


def test_iid_split() -> None:
    parts = iid_split(10, 3, seed=1)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(10))


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: dirichlet_split(_labels(), 0, 0.5), "clients"),
        (lambda: dirichlet_split(_labels(), 4, 0.0), "alpha"),
        (lambda: dirichlet_split(_labels(3), 4, 0.5), "labels"),
        (lambda: iid_split(-1, 2), "n"),
    ],
)
def test_bad_arguments_name_the_field(call, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        call()


def test_shard_split_is_a_seeded_partition_with_few_labels_per_client() -> None:
    from commhooks.data import shard_split

    labels = torch.arange(10).repeat_interleave(40)
    parts = shard_split(labels, clients=5, shards_per_client=2, seed=3)
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(400))
    assert all(len(p) == 80 for p in parts)
    assert all(labels[p].unique().numel() <= 2 for p in parts)
    again = shard_split(labels, clients=5, shards_per_client=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    with pytest.raises(ValueError, match="shards_per_client"):
        shard_split(labels, 5, 0)
    with pytest.raises(ValueError, match="labels"):
        shard_split(labels[:5], 5, 2)


def test_load_digits_is_scikit_learns_digits_without_importing_it() -> None:
    # A fresh interpreter: this one may have imported scikit-learn already.
    code = (
        "import sys; from commhooks.data import load_digits; x, y, _, _ = load_digits();"
        "print(tuple(x.shape), 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "(1437, 64) False", out.stdout
    from sklearn.datasets import load_digits as sk_digits

    ref = sk_digits()
    x_tr, y_tr, x_te, y_te = load_digits(seed=3)
    perm = torch.randperm(len(ref.target), generator=torch.Generator().manual_seed(3))
    x = torch.tensor(ref.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ref.target, dtype=torch.int64)
    cut = len(x_tr)
    assert cut == int(0.8 * len(y)) and len(x_te) == len(y) - cut
    mine = torch.cat([x_tr, x_te])
    torch.testing.assert_close(mine, x[perm], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([y_tr, y_te]), y[perm], rtol=0, atol=0)
    assert float(mine.min()) == 0.0 and float(mine.max()) == 1.0


def test_digits_come_from_scikit_learns_loader_where_the_file_is_elsewhere(tmp_path) -> None:
    found, fallback = _digits_table(), _digits_table(roots=[str(tmp_path)])
    assert found.shape == (1797, 65)
    np.testing.assert_array_equal(found, fallback)
