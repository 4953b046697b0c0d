"""What commhooks.horovod checks before any collective: bad arguments fail clearly."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

import commhooks.horovod
from commhooks.horovod import Compression, HorovodAdapter


def test_import_does_not_need_horovod_initialised() -> None:
    assert "DistributedOptimizer" in commhooks.horovod.__all__


@pytest.mark.parametrize("spec", ["topk", "sign", "powersgd", "uniform"])
def test_adapter_refuses_payloads_horovod_cannot_sum(spec: str) -> None:
    with pytest.raises(ValueError, match="DistributedOptimizer"):
        HorovodAdapter(spec)


def test_adapter_refuses_bf16_and_says_why() -> None:
    with pytest.raises(ValueError, match="no bfloat16"):
        HorovodAdapter("bf16")


@pytest.mark.parametrize("name", ["bf16", "topk", "powersgd"])
def test_compression_members_horovod_cannot_carry_raise_the_documented_error(name: str) -> None:
    with pytest.raises(ValueError, match=f"Compression.{name}: .*DistributedOptimizer"):
        getattr(Compression, name)
    assert not hasattr(Compression, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        Compression.nothing  # noqa: B018


def test_fp16_adapter_round_trips_like_a_cast() -> None:
    t = torch.randn(3, 5)
    payload, ctx = Compression.fp16.compress(t)
    assert payload.dtype == torch.float16
    torch.testing.assert_close(Compression.fp16.decompress(payload, ctx), t.half().float())


def test_randomk_adapter_sends_a_fraction_and_decodes_linearly() -> None:
    a = Compression.randomk(ratio=0.25, seed=3)
    t = torch.randn(400)
    payload, ctx = a.compress(t)
    assert payload.numel() == 100
    twice = a.decompress(2 * payload, ctx)
    torch.testing.assert_close(twice, 2 * a.decompress(payload, ctx))


def test_optimizer_needs_horovod_initialised() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"hvd\.init"):
        commhooks.horovod.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
        )


def test_horovod_build_has_pytorch_gloo_and_mpi() -> None:
    horovodrun = pathlib.Path(sys.executable).with_name("horovodrun")
    out = subprocess.run(
        [str(horovodrun), "--check-build"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for what in ("PyTorch", "Gloo", "MPI"):
        assert re.search(rf"\[X\] {what}\b", out), f"{what} missing from:\n{out}"
