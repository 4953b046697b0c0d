"""The test tree's own layout: helper modules that every folder puts on ``sys.path``."""

from __future__ import annotations

import collections
import pathlib

from _tags import TAGS, matches

TESTS = pathlib.Path(__file__).resolve().parent


def test_no_two_test_modules_share_a_name() -> None:
    # Each folder's conftest puts the folder on sys.path, and spawned workers import their
    # helpers by bare name: two ``_workers.py`` would make one folder's workers import the
    # other's when the whole suite runs in one process.
    names = collections.defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name not in ("__init__.py", "conftest.py"):
            names[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not clashes, clashes


def test_a_tag_entry_is_a_prefix_or_a_pattern() -> None:
    assert matches("ddp/test_hooks.py::test_stress_four_ranks_x", "ddp/test_hooks.py::test_stress")
    pattern = "fsdp/test_fsdp.py::*[[]nodes[]]"
    assert pattern in TAGS["slow"]
    assert matches("fsdp/test_fsdp.py::test_identity_equals_dense[nodes]", pattern)
    assert not matches("fsdp/test_fsdp.py::test_identity_equals_dense[flat]", pattern)
    assert not matches("fsdp/test_other.py::test_identity_equals_dense[nodes]", pattern)
