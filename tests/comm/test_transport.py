"""The all-gather transport's sum straight into the caller's buffers, in a gloo group of this
process alone (the multi-rank exchanges are tested through every front end)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from commhooks.comm.transport import AllGatherTransport
from commhooks.compressors.base import Context, Payload
from commhooks.compressors.sign import Sign, SignConfig


@pytest.fixture
def group(tmp_path: Any) -> Iterator[dist.ProcessGroup]:
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "s"), 1), rank=0, world_size=1
    )
    try:
        assert dist.group.WORLD is not None
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


class _TwoArgumentSign(Sign):
    """A compressor written against the two-argument ``aggregate``."""

    calls = 0

    def aggregate(self, payloads: Sequence[Payload], ctx: Context) -> Tensor:  # type: ignore[override]
        type(self).calls += 1
        return super().aggregate(payloads, ctx)


def _grads() -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(300, 200, generator=gen), torch.randn(40, 30, generator=gen)]


def test_means_written_into_out_equal_new_memory(group: dist.ProcessGroup) -> None:
    t = AllGatherTransport(Sign(SignConfig()), None, group)
    keys = ["w", "b"]
    ref, _ = t.run(keys, _grads())
    grads = _grads()
    means, _ = t.run(keys, grads, out=grads)  # the inputs themselves, as the engine passes
    assert ref is not None and means is not None
    for m, g, r in zip(means, grads, ref):
        assert m.data_ptr() == g.data_ptr()
        assert torch.equal(m, r)


def test_a_two_argument_aggregate_is_still_called_without_a_buffer(
    group: dist.ProcessGroup,
) -> None:
    t = AllGatherTransport(_TwoArgumentSign(SignConfig()), None, group)
    grads = _grads()
    means, _ = t.run(["w", "b"], grads, out=grads)
    assert means is not None and _TwoArgumentSign.calls == 2
    ref, _ = AllGatherTransport(Sign(SignConfig()), None, group).run(["w", "b"], _grads())
    assert ref is not None
    assert all(torch.equal(m, r) for m, r in zip(means, ref))
