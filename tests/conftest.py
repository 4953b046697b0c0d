"""Shared pytest set-up, and the ``run_ranks`` fixture for multi-process tests."""

from __future__ import annotations

import fcntl
import itertools
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from _pytest.mark.expression import Expression
from hypothesis import HealthCheck, settings

# Triton reads this when triton.language is first imported, which another test's imports
# (Lightning, transformers, Inductor) may do long before tests/kernels runs: set it first.
# On a CUDA machine the kernels compile for the device instead (tests/kernels/conftest.py).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

from _spawn import forkserver_spawn, ranks_runner
from _tags import TAGS, tag_and_order

# The suite runs on 2 shared cores; hypothesis' timing health checks would flake there.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci")


def _whole_path_tags(rel: str, is_dir: bool) -> set[str]:
    """The tags every test under ``rel`` (relative to tests/) gets from :data:`TAGS`."""
    target = rel.replace(os.sep, "/") + ("/" if is_dir else "")
    return {
        tag
        for tag, paths in TAGS.items()
        if any("::" not in p and target.startswith(p) for p in paths)
    }


def _never_selected(markexpr: str, tags: set[str]) -> bool:
    """Whether ``-m markexpr`` deselects every test carrying ``tags``, whatever other marks
    it has: false under every assignment of the expression's other names."""
    if "=" in markexpr:
        return False  # marks with keyword arguments: left to pytest's own deselection
    expr = Expression.compile(markexpr)
    free = sorted(set(re.findall(r"[A-Za-z_][\w.-]*", markexpr)) - {"and", "or", "not"} - tags)
    if len(free) > 12:
        return False
    for values in itertools.product((False, True), repeat=len(free)):
        on = tags | {n for n, v in zip(free, values) if v}
        if expr.evaluate(lambda name, /, on=on, **kw: name in on and not kw):
            return False
    return True


def pytest_ignore_collect(collection_path: pathlib.Path, config: Any) -> bool | None:
    """Under ``-m``, leave out whole files and directories whose tags deselect all their
    tests, without importing them: ``make test-fast`` would otherwise import Lightning,
    transformers and accelerate (about 10 s of CPU) only to deselect their tests."""
    markexpr = config.option.markexpr
    if not markexpr:
        return None
    rel = os.path.relpath(collection_path, os.path.dirname(__file__))
    if rel.startswith(".."):
        return None
    tags = _whole_path_tags(rel, collection_path.is_dir())
    return True if tags and _never_selected(markexpr, tags) else None


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    tag_and_order(items, os.path.dirname(__file__), lambda item, tag: item.add_marker(tag))


@pytest.fixture(autouse=True)
def _netns_tests_take_turns(request: Any, tmp_path_factory: Any) -> Iterator[None]:
    """Tests tagged ``root`` (they create network namespaces) hold one lock that all of the
    run's pytest-xdist workers share: the namespaces' names are fixed and
    tests/launch/test_netns.py checks the machine's, so they must not overlap."""
    if request.node.get_closest_marker("root") is None:
        yield
        return
    # Workers' base folders are popen-gw0, popen-gw1, ... in one folder of the run.
    with open(tmp_path_factory.getbasetemp().parent / "netns-tests.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture
def run_ranks(tmp_path: Any) -> Callable[..., list[Any]]:
    """``run_ranks(fn, world, *args)``: see :func:`_spawn.ranks_runner`."""
    return ranks_runner(tmp_path)


@pytest.fixture
def fast_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.multiprocessing.spawn`` starts its ranks from the fork server during the test
    (for benchmark code the test calls, which spawns its own ranks)."""
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "spawn", forkserver_spawn)
