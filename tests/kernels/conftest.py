"""Shared by the kernel tests: the Triton kernels on CPU tensors, in Triton's interpreter."""

from __future__ import annotations

import os
import sys

import pytest

# TRITON_INTERPRET=1 is set by tests/conftest.py where there is no CUDA device. On a CUDA
# machine the kernels are compiled for the device instead (test_cuda_kernels.py runs them
# there) and the interpreter tests skip, unless TRITON_INTERPRET=1 is set by hand (with
# CUDA_VISIBLE_DEVICES= they run as they do here).
sys.path.insert(0, os.path.dirname(__file__))  # _exchange.py


@pytest.fixture
def triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressors take the Triton kernels for CPU tensors (``COMMHOOKS_KERNELS=triton``)."""
    monkeypatch.setenv("COMMHOOKS_KERNELS", "triton")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernels anywhere: the torch reference code."""
    monkeypatch.setenv("COMMHOOKS_KERNELS", "torch")
