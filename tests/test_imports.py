"""The package's module import graph has no cycles, and only ``commhooks.kernels`` reaches
the native kernels.

Every import counts: module level, inside functions (call-time imports) and under
``if TYPE_CHECKING:``. A cycle that only annotations or a deferred import close is still two
modules that cannot be read, tested or moved one without the other.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "commhooks"

__all__ = ["find_cycles", "import_graph", "importers_of"]


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``from ... import`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    # A package's own ``__init__`` is its package; a module's level-1 base is its parent.
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop] if drop else base
    return ".".join(base + ([node.module] if node.module else []))


def _entered_packages(target: str, module: str, files: dict[str, pathlib.Path]) -> set[str]:
    """The packages whose ``__init__`` importing ``target`` from ``module`` runs: every
    ancestor package of ``target`` that ``module`` is not inside."""
    parts = target.split(".")
    ancestors = (".".join(parts[:i]) for i in range(1, len(parts)))
    return {p for p in ancestors if p in files and p != module and not module.startswith(p + ".")}


def import_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
    Importing ``a.b.c`` first runs the ``__init__`` of ``a`` and ``a.b``, so each of those is
    an edge too, except from a module inside that package: Python has already started its
    ``__init__`` then (counting it would put every module in a cycle with its package).
    """
    files = {
        _module_name(path, root): path
        for path in (root / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                # ``import a.b.c`` where only ``a.b`` is ours (a name, not a module).
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
                    edges.update(_entered_packages(target, module, files))
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        # Iterative, so a deep package cannot hit the recursion limit.
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def importers_of(graph: dict[str, set[str]], target: str) -> list[str]:
    """The modules of ``graph`` that import ``target`` or one of its submodules, outside
    ``target`` itself."""
    inside = (target, target + ".")
    return sorted(
        m
        for m, deps in graph.items()
        if not m.startswith(inside) and any(d == target or d.startswith(target + ".") for d in deps)
    )


def test_only_the_kernels_package_imports_native() -> None:
    """Every kernel op is dispatched by ``commhooks.kernels`` (op, device); a module that
    imports ``commhooks.native`` itself bypasses that dispatch point."""
    outside = [
        m
        for m in importers_of(import_graph(), "commhooks.native")
        if m != "commhooks.kernels" and not m.startswith("commhooks.kernels.")
    ]
    assert not outside, f"import commhooks.native outside commhooks.kernels: {outside}"


def test_importers_of_sees_a_call_time_import(tmp_path: pathlib.Path) -> None:
    (tmp_path / "pkg" / "native").mkdir(parents=True)
    sources = {
        "__init__": "",
        "native/__init__": "from pkg.native import lib\n",
        "native/lib": "",
        "kernels": "from pkg.native import lib\n",
        "codec": "def f():\n    from pkg import native\n",
        "other": "import torch\n",
    }
    for name, source in sources.items():
        (tmp_path / "pkg" / f"{name}.py").write_text(source)
    graph = import_graph(tmp_path, "pkg")
    assert importers_of(graph, "pkg.native") == ["pkg.codec", "pkg.kernels"]


def test_package_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (TYPE_CHECKING and call-time imports count):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        # Each kind of import the test must see, closing a two-module cycle.
        ({"a": "from pkg import b\n", "b": "import pkg.a\n"}, ["pkg.a", "pkg.b"]),
        (
            {
                "a": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.b import X\n",
                "b": "from pkg.a import Y\n",
            },
            ["pkg.a", "pkg.b"],
        ),
        ({"a": "def f():\n    from .b import X\n", "b": "from . import a\n"}, ["pkg.a", "pkg.b"]),
        (
            {"a": "from pkg.b import X\n", "b": "from pkg.c import Y\n", "c": "import pkg.a\n"},
            ["pkg.a", "pkg.b", "pkg.c"],
        ),
        ({"a": "from pkg.b import X\n", "b": "import torch\n"}, None),
    ],
)
def test_cycle_finder_sees_every_kind_of_import(
    tmp_path: pathlib.Path, sources: dict[str, str], cycle: list[str] | None
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in sources.items():
        (package / f"{name}.py").write_text(source)
    assert find_cycles(import_graph(tmp_path, "pkg")) == ([cycle] if cycle else [])


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        # reg imports the subpackage's base, which runs sub/__init__, which loads algo, which
        # imports reg: a cycle no single import statement shows.
        (
            {
                "sub/__init__": "from pkg.sub import algo\n",
                "sub/base": "",
                "sub/algo": "from pkg import reg\n",
                "reg": "from pkg.sub.base import B\n",
            },
            ["pkg.reg", "pkg.sub", "pkg.sub.algo"],
        ),
        # A module inside the subpackage does not run its __init__ again.
        (
            {
                "sub/__init__": "from pkg.sub import algo\n",
                "sub/base": "",
                "sub/algo": "from pkg.sub.base import B\n",
            },
            None,
        ),
    ],
)
def test_cycle_finder_counts_the_packages_an_import_enters(
    tmp_path: pathlib.Path, sources: dict[str, str], cycle: list[str] | None
) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for name, source in sources.items():
        (tmp_path / "pkg" / f"{name}.py").write_text(source)
    assert find_cycles(import_graph(tmp_path, "pkg")) == ([cycle] if cycle else [])
