"""torch.distributed collectives on real gloo ranks: the pieced all-gather against one call."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from commhooks.comm.collectives import MAX_PIECES, PIECE_BYTES, TorchCollectives, _slices
from tests._spawn import init

# Below one piece, exactly two, an odd count between, and past the cap; bytes and fp32.
SIZES = [(1000, torch.uint8), (2 * PIECE_BYTES, torch.uint8), (3 * PIECE_BYTES + 7, torch.uint8),
         ((MAX_PIECES + 3) * PIECE_BYTES // 4 + 1, torch.float32)]  # fmt: skip


def _pieces_worker(rank: int, world: int, store: str, out: str) -> None:
    init(rank, world, store)
    comm = TorchCollectives()
    results = []
    for n, dtype in SIZES:
        gen = torch.Generator().manual_seed(1000 * rank + n)
        own = torch.randint(0, 250, (n,), generator=gen).to(dtype)
        want = torch.empty(world * n, dtype=dtype)
        dist.all_gather_into_tensor(want, own)
        results.append((comm._pieces(own), comm.all_gather(own), want))
    torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_pieced_all_gather_equals_one_call(run_ranks, world: int) -> None:
    for results in run_ranks(_pieces_worker, world):
        assert [p for p, _, _ in results] == [1, 2, 3, MAX_PIECES]
        for _, got, want in results:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_slices_cover_in_order() -> None:
    for n, k in [(10, 3), (8, 8), (2**20 + 5, 8)]:
        cuts = _slices(n, k)
        assert len(cuts) == k and cuts[0].start == 0 and cuts[-1].stop == n
        assert all(a.stop == b.start for a, b in itertools.pairwise(cuts))
        assert max(c.stop - c.start for c in cuts) - min(c.stop - c.start for c in cuts) <= 1
