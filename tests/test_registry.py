"""Names, spec strings and the errors they give."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from test_imports import import_graph

import commhooks
from commhooks.compressors.pipeline import PipelineConfig
from commhooks.compressors.topk import TopKConfig
from commhooks.registry import register_pipeline

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "commhooks"

EXPECTED = {
    "topk", "randomk", "threshold", "dgc", "uniform", "qsgd", "nonuniform",
    "ternary", "sign", "adaptive", "powersgd", "fp16", "bf16", "identity",
}  # fmt: skip


def test_every_family_is_registered() -> None:
    assert set(commhooks.available()) == EXPECTED


def test_spec_values_are_typed_by_the_config() -> None:
    c = commhooks.compressor("topk:ratio=0.05,mode=exact,sample=100,index_coding=delta")
    assert c.config == TopKConfig(ratio=0.05, mode="exact", sample=100, index_coding="delta")


def test_config_objects_and_compressors_pass_through() -> None:
    cfg = TopKConfig(ratio=0.2)
    c = commhooks.compressor(cfg)
    assert c.config is cfg and commhooks.compressor(c) is c


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nosuch", "unknown"),
        ("", "non-empty"),
        ("topk:ratio", "field=value"),
        ("topk:rate=0.1", "unknown field 'rate'"),
        ("topk:ratio=x", "ratio"),
        ("randomk:unbiased=2", "unbiased"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        commhooks.compressor(spec)


def test_non_spec_objects_are_refused() -> None:
    with pytest.raises(ValueError, match="spec"):
        commhooks.compressor(42)  # type: ignore[arg-type]


def test_pipeline_specs_build_the_registered_pipeline() -> None:
    cfg = commhooks.parse_spec("topk:ratio=0.01|uniform:bits=4")
    assert isinstance(cfg, PipelineConfig) and [s.name for s in cfg.stages] == ["topk", "uniform"]
    assert register_pipeline(PipelineConfig) is PipelineConfig  # the same factory again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_pipeline(lambda *, stages: PipelineConfig(stages=stages))


def test_a_pipeline_spec_without_the_pipeline_module_says_what_to_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commhooks.registry, "_PIPELINE", [])
    with pytest.raises(ValueError, match=r"import commhooks\.compressors\.pipeline"):
        commhooks.parse_spec("topk|uniform")


# -- imports: the dependency between modules goes one way -----------------------------------------


def test_registry_imports_no_compressor() -> None:
    """Compressors import the registry to register themselves, so the registry, even lazily
    inside a function, imports none of them (the pipeline registers its own factory); the
    compressors package it enters loads only the codec contract. The graph's cycle check is
    in ``test_imports.py``."""
    graph = import_graph()
    compressors = {m for m in graph["commhooks.registry"] if m.startswith("commhooks.compressors")}
    assert compressors == {"commhooks.compressors", "commhooks.compressors.base"}
    assert graph["commhooks.compressors"] == {"commhooks.compressors.base"}
    assert "commhooks.registry" in graph["commhooks.compressors.topk"]


# Runs in a fresh interpreter: imports torch (and torch._dynamo, which DDP, FSDP and the
# kernels pull in) once, then forks a child per module, so each child imports its module with
# no commhooks module loaded (as ``python -c "import X"`` would) without paying torch's import
# ~60 times on the suite's 2 shared cores.
_FRESH_IMPORTS = """
import os, sys, traceback
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
failed, running, imported = [], {}, []

def reap():
    pid, status = os.wait()
    (failed if os.waitstatus_to_exitcode(status) else imported).append(running.pop(pid))

for name in sys.argv[1:]:
    if len(running) >= (os.cpu_count() or 1):
        reap()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            assert not any(m.split(".")[0] == "commhooks" for m in sys.modules)
            __import__(name)
        except BaseException:
            print(f"== import {name}", file=sys.stderr)
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    running[pid] = name
while running:
    reap()
print(" ".join(sorted(imported)))
print(" ".join(sorted(failed)))
"""


def test_every_module_imports_fresh() -> None:
    """Each module imported first, in a fresh interpreter: a cycle through packages'
    ``__init__`` that only works in the usual import order fails here."""
    # ``-c`` puts the working directory first on the path: this checkout's package is imported.
    res = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORTS, *import_graph()],
        capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    imported, failed = (line.split() for line in res.stdout.splitlines())
    assert failed == [], res.stderr[-8000:]
    assert imported == sorted(import_graph()) and len(imported) > 40


def test_a_field_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="field 'ratio' is given twice"):
        commhooks.parse_spec("topk:ratio=0.01,ratio=0.02")
