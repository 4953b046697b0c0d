"""Shared pytest set-up, and the ``run_ranks`` fixture for multi-process tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton reads this when triton.language is first imported, which another test's imports
# (Lightning, transformers, Inductor) may do long before tests/kernels runs: set it first.
# On a CUDA machine the kernels compile for the device instead (tests/kernels/conftest.py).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

from _spawn import ranks_runner

# The suite runs on 2 shared cores; hypothesis' timing health checks would flake there.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci")


@pytest.fixture
def run_ranks(tmp_path: Any) -> Callable[..., list[Any]]:
    """``run_ranks(fn, world, *args)``: see :func:`_spawn.ranks_runner`."""
    return ranks_runner(tmp_path)
