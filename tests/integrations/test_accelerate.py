"""commhooks.integrations.accelerate on real accelerate, 2 CPU processes over gloo."""

from __future__ import annotations

import pathlib

import pytest
import torch
from _frameworks import assert_compressed, on_ranks
from accelerate import Accelerator
from torch import nn

from commhooks.integrations.accelerate import register_accelerate

HERE = pathlib.Path(__file__).resolve().parent


def test_compresses_on_two_cpu_ranks() -> None:
    stats = assert_compressed(on_ranks(HERE / "_accelerate_worker.py"))
    assert {steps for steps, _, _ in stats.values()} == {5}


def test_fsdp2_model_compresses_on_two_cpu_ranks() -> None:
    stats = assert_compressed(on_ranks(HERE / "_accelerate_fsdp_worker.py"))
    assert {steps for steps, _, _ in stats.values()} == {5}


def test_refuses_a_model_accelerate_did_not_wrap_in_ddp() -> None:
    # One process, no process group: prepare() hands the module back unwrapped.
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(64, 64))
    with pytest.raises(RuntimeError, match=r"model: expected .*DistributedDataParallel.*Linear"):
        register_accelerate(accelerator, model, "sign")


def test_refuses_bad_options_before_looking_at_the_model() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="min_numels"):
        register_accelerate(None, model, "sign", min_numels=1)
    with pytest.raises(ValueError, match="transport"):
        register_accelerate(None, model, "sign", transport="carrier-pigeon")
    with pytest.raises(ValueError):
        register_accelerate(None, model, torch.zeros(1))  # type: ignore[arg-type]
