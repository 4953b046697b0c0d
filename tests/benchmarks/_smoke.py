"""Runs a benchmark script's ``--smoke`` mode and reads back the report it wrote."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]


def smoke_report(script: str, tmp_path: pathlib.Path) -> tuple[dict[str, Any], str]:
    """Run ``benchmarks/<script>.py --smoke`` (failing the test if it fails) and return its
    JSON report and its markdown table."""
    out, md = tmp_path / f"{script}.json", tmp_path / f"{script}.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke",
         "--out", str(out), "--markdown", str(md)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return json.loads(out.read_text()), md.read_text()
