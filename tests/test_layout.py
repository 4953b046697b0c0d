"""The test tree's own layout: helper modules that every folder puts on ``sys.path``."""

from __future__ import annotations

import collections
import pathlib

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
