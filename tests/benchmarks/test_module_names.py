"""The scripts and helpers that tests put on ``sys.path`` never shadow an installed package.

The benchmarks' directory goes on ``sys.path`` in the test process (their modules are
imported by the tests), so a script named like a distribution's top-level module (the
Hugging Face ``kernels`` package, which transformers imports) would replace it for every
later import in that process."""

from __future__ import annotations

import importlib.metadata
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ON_PATH = [
    ROOT / "benchmarks",
    ROOT / "tests",
    *(p for p in (ROOT / "tests").iterdir() if p.is_dir()),
]


def test_no_module_on_the_tests_path_shadows_an_installed_package() -> None:
    installed = set(importlib.metadata.packages_distributions())
    assert "torch" in installed  # the lookup works
    ours = {f.stem: f for d in ON_PATH for f in d.glob("*.py") if f.stem != "__init__"}
    clashes = {name: str(f.relative_to(ROOT)) for name, f in ours.items() if name in installed}
    assert clashes == {}
