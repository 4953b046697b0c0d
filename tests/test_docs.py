"""The measured table in docs/compressors.md must match what the code sends today."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

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
