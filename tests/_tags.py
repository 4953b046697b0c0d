"""The test tree's tags by path (``pytest -m``), applied in ``conftest.py``."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from typing import Any

__all__ = ["HEAVY", "TAGS", "matches", "tag_and_order"]

#: Tags by path (``pytest -m``), so tests need no decorator each: ``make test-fast`` leaves out
#: ``slow``, ``launcher`` and ``root``. ``multiproc``: real gloo ranks spawned by the test. An
#: entry is a prefix of ``path::test_name[params]``, or a ``fnmatch`` pattern where it has a
#: ``*`` (``[[]`` matches a bracket).
TAGS: dict[str, tuple[str, ...]] = {
    # Runs the real frameworks, benchmark scripts, convergence or demo jobs, the docs'
    # snippets, a fresh interpreter per module, or 4 ranks (the stress test, the 2-node
    # layouts): ``make test-fast`` keeps unit, contract and 2-rank tests.
    "slow": (
        "integrations/",
        "benchmarks/",
        "examples/",
        "ddp/test_convergence.py",
        "federated/test_federated_convergence.py",
        "test_demo.py",
        "kernels/test_gpu_check.py",
        "native/test_native_build.py",
        "docker/",
        "ddp/test_hooks.py::test_stress_four_ranks",
        "ddp/test_hooks.py::test_matches_torch_builtin_hooks[4]",
        "engine/test_host_reads.py::test_hierarchical_steps_read_nothing_back",
        "fsdp/test_fsdp.py::*[[]nodes[]-]*",
        "fsdp/test_fsdp.py::test_bad_input_nodes",
        "fsdp/test_fsdp.py::test_hierarchical_feedback_is_a_shard",
        "test_docs.py::test_snippet_runs",
        "test_registry.py::test_every_module_imports_fresh",
    ),
    # Starts torchrun, horovodrun or mpirun as subprocesses.
    "launcher": (
        "horovod/",
        "launch/test_cli.py",
        "test_mpi.py",
        "ddp/test_ddp_hierarchical.py",
    ),
    # Creates network namespaces (root).
    "root": (
        "launch/test_netns.py",
        "launch/test_cli.py::test_shaped_mode_runs_an_example",
        "benchmarks/test_e2e.py",
        "benchmarks/test_sleep_step.py",
        "benchmarks/test_diloco_link.py",
        "benchmarks/test_fsdp_shaped.py",
        "test_demo.py::test_demo_over_shaped_links",
    ),
    "multiproc": (
        "comm/",
        "ddp/",
        "engine/",
        "federated/",
        "diloco/",
        "fsdp/",
        "test_metrics.py",
        "test_spawn.py",
    ),
}


def matches(node: str, entry: str) -> bool:
    """Whether a :data:`TAGS` entry names this test: a prefix, or a pattern with ``*``."""
    return fnmatch.fnmatchcase(node, entry) if "*" in entry else node.startswith(entry)


#: tags whose modules run first: a long test started last would leave the other worker idle
HEAVY = frozenset({"slow", "launcher", "root"})


def tag_and_order(items: list[Any], root: str, mark: Callable[[Any, str], None]) -> None:
    """Marks each collected test with its tags (``mark(item, tag)``), then orders the modules
    in place: those that hold a :data:`HEAVY` test first, and among them the ones with a
    ``root`` test (which take turns across workers, see tests/conftest.py) spread evenly
    through the others, so that two workers seldom wait on each other. Each module's tests
    keep their order and stay together (module fixtures start once). ``root``: the folder
    the :data:`TAGS` paths are relative to."""
    kind: dict[Any, int] = {}  # 0: holds a root test, 1: another heavy one, 2: neither
    for item in items:
        rel = os.path.relpath(str(item.path), root).replace(os.sep, "/")
        node = f"{rel}::{item.name}"
        tags = [tag for tag, paths in TAGS.items() if any(matches(node, p) for p in paths)]
        for tag in tags:
            mark(item, tag)
        here = 0 if "root" in tags else 1 if HEAVY.intersection(tags) else 2
        kind[item.path] = min(kind.get(item.path, 2), here)
    modules = list(dict.fromkeys(item.path for item in items))
    rooted = [m for m in modules if kind[m] == 0]
    heavy = [m for m in modules if kind[m] == 1]
    turns, step = list(heavy), (len(heavy) + 1) / (len(rooted) + 1)
    for j, m in enumerate(rooted):  # spread evenly through the heavy ones
        turns.insert(round((j + 1) * step) + j, m)
    rank = {m: i for i, m in enumerate(turns + [m for m in modules if kind[m] == 2])}
    items.sort(key=lambda item: rank[item.path])
