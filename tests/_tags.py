"""The test tree's tags by path (``pytest -m``), applied in ``conftest.py``."""

from __future__ import annotations

import fnmatch

__all__ = ["TAGS", "matches"]

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
        "fsdp/test_fsdp.py::*[[]nodes[]]",
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
        "benchmarks/test_e2e.py",
        "benchmarks/test_sleep_step.py",
        "benchmarks/test_diloco_link.py",
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
