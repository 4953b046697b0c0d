"""Shared helpers of the benchmarks: variant labels, Markdown tables and reports."""

from __future__ import annotations

import ast
import json
import statistics
from collections.abc import Sequence
from typing import Any


def by_label(results: Sequence[Any]) -> dict[str, list[Any]]:
    """Results grouped by ``label``, in first-seen order (one entry per seed)."""
    groups: dict[str, list[Any]] = {}
    for r in results:
        groups.setdefault(r.label, []).append(r)
    return groups


def accuracy_cells(rows: Sequence[Any]) -> str:
    """``mean | min / max`` of the rows' accuracies, for a table row."""
    accs = [r.accuracy for r in rows]
    return f"{statistics.mean(accs):.2f} | {min(accs):.2f} / {max(accs):.2f}"


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{"min", "median", "max"}`` of ``values``."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def write(md: str, data: object, markdown_path: str = "", json_path: str = "") -> None:
    """Print the Markdown report and save it and its data where asked (empty: not saved)."""
    print(md)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(md + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)


def parse_variant(label: str) -> tuple[str, dict[str, object]]:
    """``"spec"`` or ``"spec@option=value,..."`` (hook options, e.g. ``sign@coalesce=True``):
    the spec and the options, values read as Python literals."""
    spec, _, rest = label.partition("@")
    options: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = ast.literal_eval(value)
    return spec, options
