"""The docs against the code: docs/compressors.md's measured table matches what the code
sends, every Python snippet in README.md and docs/*.md runs, and the docs state the present
(history lives in CHANGELOG.md)."""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _spawn import run_script  # noqa: E402
from wire_table import SPECS, bits_per_element  # noqa: E402

DOC = (ROOT / "docs" / "compressors.md").read_text()
SECTION = DOC.split("## Measured bits per element", 1)[1].split("\n## ", 1)[0]
ROWS = {
    m.group(1).replace("\\|", "|"): float(m.group(2))
    for m in re.finditer(r"^\| `(.+?)` \| ([0-9.]+) \|$", SECTION, re.M)
}


def test_the_table_lists_every_benchmarked_spec() -> None:
    assert sorted(ROWS) == sorted(SPECS)


@pytest.mark.parametrize("spec", SPECS)
def test_documented_bits_match_the_wire(spec: str) -> None:
    # The table rounds to 3 decimals.
    assert ROWS[spec] == pytest.approx(bits_per_element(spec), abs=0.0006)


def test_every_registered_name_has_a_row_in_the_overview() -> None:
    import commhooks

    for name in commhooks.available():
        assert f"| `{name}` |" in DOC, f"docs/compressors.md has no row for {name}"


# -- snippets -------------------------------------------------------------------------------
#
# Every ```python block in README.md and docs/*.md runs. An HTML comment on the line before
# the fence says how:
#
#   (none), <!-- snippet: python -->  run once as a script, in a fresh temporary directory
#   <!-- snippet: torchrun -->         run on 2 ranks, each with the variables that
#                                      torchrun --standalone --nproc_per_node=2 sets
#
# Both start from the fork server (tests/_spawn.run_script), which has imported torch once.
#
# Lines after the first line of the comment, up to ``-->``, are set-up code run before the
# snippet and hidden from readers: the model or optimizer a fragment takes as given.

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(
    r"(?:<!-- snippet: (?P<mode>\w+)(?P<arg>[^\n]*?)(?:\n(?P<setup>.*?))?-->\n)?"
    r"```python\n(?P<code>.*?)```",
    re.S,
)
# torchrun snippets end with the group torn down cleanly: objects holding gloo resources are
# freed while the group lives (freed at exit instead, gloo can abort the process).
EPILOGUE = """
import gc as _gc, sys as _sys, torch.distributed as _dist
for _k in [k for k, v in list(globals().items())
           if not k.startswith("_") and not isinstance(v, type(_sys))]:
    del globals()[_k]
_gc.collect()
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""


def _snippets() -> list[Any]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in SNIPPET.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            mode = m["mode"] or "python"
            found.append(
                pytest.param(
                    mode, (m["arg"] or "").strip(), m["setup"] or "", m["code"],
                    id=f"{path.name}:{line}",
                )
            )  # fmt: skip
    return found


@pytest.mark.parametrize(("mode", "arg", "setup", "code"), _snippets())
def test_snippet_runs(mode: str, arg: str, setup: str, code: str, tmp_path: Any) -> None:
    assert mode in ("python", "torchrun"), f"unknown snippet mode {mode!r}"
    assert not arg, f"snippet mode {mode!r} takes no argument, got {arg!r}"
    script = tmp_path / "snippet.py"
    script.write_text(setup + "\n" + code + (EPILOGUE if mode == "torchrun" else ""))
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    run_script(script, 2 if mode == "torchrun" else 1, env=env)


def test_every_doc_has_its_snippets_found() -> None:
    # A fence the pattern misses would go untested: count them independently.
    fences = sum(p.read_text().count("```python\n") for p in DOCS)
    assert len(_snippets()) == fences > 0


# -- docs describe the present ----------------------------------------------------------------
#
# History goes in CHANGELOG.md; the docs say what is true now and how to reproduce it.

NARRATION = [
    r"\bwas\b(?:[^.|\n]|\.\d){0,40}?,? now\b",  # "was 66.9 ms, now 22.2"
    r"\bprevious (run|session|commit)s?\b",
    r"\b(this|last|earlier|first|second|third|fourth|fifth|sixth) session\b",
    r"\bsession's\b",
    r"\b(last|earlier|latest) run\b",
    r"\bwhat changed\b",
    r"\bbefore this (session|commit|change)\b",
]
HISTORY_FREE = DOCS


@pytest.mark.parametrize("path", HISTORY_FREE, ids=lambda p: p.name)
def test_docs_state_the_present_not_history(path: pathlib.Path) -> None:
    text = path.read_text()
    hits = [
        f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for pattern in NARRATION
        for m in re.finditer(pattern, text, re.I)
    ]
    assert not hits, "narration belongs in CHANGELOG.md:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "sample",
    ["was 66.9 ms, now 22.2", "the previous run measured", "in this session", "our last run",
     "What changed in the fourth session"],
)  # fmt: skip
def test_the_narration_patterns_catch_narration(sample: str) -> None:
    assert any(re.search(p, sample, re.I) for p in NARRATION)
