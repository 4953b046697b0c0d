"""The test tree's own layout: helper modules that every folder puts on ``sys.path``."""

from __future__ import annotations

import collections
import pathlib

from _tags import TAGS, matches, tag_and_order

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
    pattern = "fsdp/test_fsdp.py::*[[]nodes[]-]*"
    assert pattern in TAGS["slow"]
    assert matches("fsdp/test_fsdp.py::test_identity_equals_dense[nodes]", pattern)
    assert matches("fsdp/test_fsdp.py::test_every_compressor_compresses[nodes-sign]", pattern)
    assert not matches("fsdp/test_fsdp.py::test_identity_equals_dense[flat]", pattern)
    assert not matches("fsdp/test_other.py::test_identity_equals_dense[nodes]", pattern)


def test_heavy_modules_run_first_root_ones_spread_and_each_module_stays_whole() -> None:
    class Item:
        def __init__(self, rel: str, name: str) -> None:
            self.path, self.name = TESTS / rel, name

    items = [
        Item("compressors/test_topk.py", "test_a"),
        Item("compressors/test_topk.py", "test_b"),
        Item("ddp/test_hooks.py", "test_matches_torch_builtin_hooks[2]"),
        Item("ddp/test_hooks.py", "test_stress_four_ranks_many_buckets"),  # slow: module first
        Item("launch/test_netns.py", "test_x"),  # root
        Item("benchmarks/test_e2e.py", "test_y"),  # root
        Item("test_mpi.py", "test_x"),  # launcher
        Item("test_feedback.py", "test_y"),
    ]
    order = list(items)
    marks: list[tuple[str, str]] = []
    tag_and_order(items, str(TESTS), lambda item, tag: marks.append((item.name, tag)))
    # heavy modules: hooks, mpi; root ones (netns, e2e) spread among them; then the rest in order
    assert items == [order[i] for i in (2, 3, 4, 6, 5, 0, 1, 7)]
    assert ("test_stress_four_ranks_many_buckets", "slow") in marks
    assert ("test_x", "launcher") in marks and ("test_y", "root") in marks
    assert ("test_matches_torch_builtin_hooks[2]", "multiproc") in marks
    assert not [m for m in marks if m[0] in ("test_a", "test_b")]


def test_every_test_that_brings_up_a_shaped_cluster_is_tagged_root() -> None:
    """They take turns on one lock (tests/conftest.py) by this tag."""
    shaped = [
        "launch/test_netns.py::test_a",
        "launch/test_cli.py::test_shaped_mode_runs_an_example",
        "benchmarks/test_fsdp_shaped.py::test_fsdp_shaped_smoke_writes_report",
        "benchmarks/test_sleep_step.py::test_sleep_step_smoke_writes_report",
        "benchmarks/test_diloco_link.py::test_diloco_link_smoke_writes_report",
        "benchmarks/test_e2e.py::test_e2e_smoke_writes_report",
        "test_demo.py::test_demo_over_shaped_links",
    ]
    for node in shaped:
        assert any(matches(node, entry) for entry in TAGS["root"]), node
    assert not any(matches("test_demo.py::test_bad_spec", e) for e in TAGS["root"])
