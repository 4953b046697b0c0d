"""Names, spec strings and the errors they give."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

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


# -- imports: the dependency between modules goes one way -----------------------------------------


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when the module is imported: not function bodies (a lazy import
    runs when called) and not ``if TYPE_CHECKING:`` blocks (only type checkers read them)."""
    out: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                out += _import_time_statements(stmt.body)
            out += _import_time_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                out += _import_time_statements(block)
        elif isinstance(stmt, (ast.With, ast.ClassDef)):
            out += _import_time_statements(stmt.body)
        else:
            out.append(stmt)
    return out


def _imported(module: str, stmts: list[ast.stmt], modules: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules that ``stmts`` of ``module`` import: ``from a import b`` imports
    the module ``a.b`` where there is one, else ``a`` (or its closest enclosing module)."""

    def enclosing(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    is_package = modules[module].name == "__init__.py"
    found: set[str | None] = set()
    for stmt in stmts:
        if isinstance(stmt, ast.Import):
            found.update(enclosing(a.name) for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(stmt.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for a in stmt.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else enclosing(base))
    found.discard(module)
    return {m for m in found if m is not None}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time."""
    modules = _modules()
    return {
        m: _imported(m, _import_time_statements(ast.parse(path.read_text()).body), modules)
        for m, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_module_import_graph_is_acyclic() -> None:
    """No cycle among the imports each module runs when imported.

    An edge goes to the module named, not to the packages enclosing it: a package's
    ``__init__`` re-exporting its modules, which import their siblings, is no cycle. What the
    enclosing packages' ``__init__`` run is covered by the fresh imports below.
    """
    graph = _import_graph()
    # Edges known to exist, so that a parser finding none cannot pass.
    assert "commhooks.registry" in graph["commhooks.compressors.pipeline"]
    assert "commhooks.compressors._powersgd_exchange" in graph["commhooks.compressors.powersgd"]
    assert "commhooks.compressors.topk" in graph["commhooks.compressors"]
    cycles = _cycles(graph)
    report = [f"{a} -> {b}" for c in cycles for a in c for b in sorted(graph[a] & set(c))]
    assert not cycles, "import cycles among modules:\n" + "\n".join(report)


def test_registry_imports_no_compressor() -> None:
    """Compressors import the registry to register themselves, so the registry, even lazily
    inside a function, imports none of them (the pipeline registers its own factory)."""
    tree = ast.parse((PACKAGE / "registry.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    imported = _imported("commhooks.registry", imports, _modules())
    compressors = {m for m in imported if m.startswith("commhooks.compressors.")}
    assert compressors == {"commhooks.compressors.base"}


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
        [sys.executable, "-c", _FRESH_IMPORTS, *_modules()],
        capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    imported, failed = (line.split() for line in res.stdout.splitlines())
    assert failed == [], res.stderr[-8000:]
    assert imported == sorted(_modules()) and len(imported) > 40


def test_a_field_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="field 'ratio' is given twice"):
        commhooks.parse_spec("topk:ratio=0.01,ratio=0.02")
