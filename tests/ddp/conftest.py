"""The DDP workers live beside these tests; ``run_ranks`` comes from tests/conftest.py."""

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def world_of_one(tmp_path: Any) -> Iterator[None]:
    """A gloo process group of this process alone."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
