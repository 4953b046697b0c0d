"""Shared by the kernel tests: the Triton kernels on CPU tensors, in Triton's interpreter."""

from __future__ import annotations

import os

import pytest

# Read when the kernels are first decorated, so before any test imports them; a CUDA machine
# runs the same tests on CPU tensors in the interpreter too (its device runs tests/kernels'
# CUDA-marked ones).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressors take the Triton kernels for CPU tensors (``COMMHOOKS_KERNELS=triton``)."""
    monkeypatch.setenv("COMMHOOKS_KERNELS", "triton")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernels anywhere: the torch reference code."""
    monkeypatch.setenv("COMMHOOKS_KERNELS", "torch")
