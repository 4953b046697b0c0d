"""The report: medians over reps, ratios, the targets, and the Markdown tables. See
``e2e.py``."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from _report import accuracy_cells, by_label
from e2e_config import (
    BASELINES,
    COMPUTE,
    DENSE,
    FLAT,
    HIER,
    INT8,
    LINK_BOUND,
    NONE,
    TORCH_PSGD,
    TORCH_PSGD_1B,
    Config,
    Row,
    Target,
    TTARow,
)
from e2e_variants import FALLBACK, RS, describe

import commhooks
import commhooks.ddp

__all__ = [
    "int8_label",
    "markdown",
    "node_pairs",
    "node_table",
    "node_targets",
    "row_key",
    "row_targets",
    "summarize",
    "targets",
    "torch_psgd_row",
    "tta_summary",
]


def row_key(r: Row) -> tuple[str, int, str]:
    return r.model, r.ranks, r.link


def torch_psgd_row(group: Sequence[Row]) -> Row | None:
    """torch's PowerSGD to compare ours with: the one-bucket run, measured interleaved with
    ours, else the default-bucket one (a launch of its own)."""
    ok = {r.label: r for r in group if r.error is None and r.median_s}
    return ok.get(TORCH_PSGD_1B) or ok.get(TORCH_PSGD)


def summarize(rows: list[Row]) -> None:
    """Fill in min / median / max and the ratios to dense and to torch's PowerSGD."""
    groups: dict[tuple[str, int, str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((*row_key(r), r.per_node), []).append(r)
        if r.step_s:
            r.min_s, r.median_s, r.max_s = min(r.step_s), statistics.median(r.step_s), max(r.step_s)
    for group in groups.values():
        dense = next((r for r in group if r.label == DENSE and r.median_s), None)
        tps = torch_psgd_row(group)
        for r in group:
            if r.median_s is None:
                continue
            if dense is not None and dense.median_s:
                r.vs_dense = r.median_s / dense.median_s
            if tps is not None and tps.median_s and r.label.startswith("powersgd"):
                r.vs_torch_powersgd = r.median_s / tps.median_s


def tta_summary(tta: list[TTARow]) -> list[dict[str, Any]]:
    """Per (ranks, link, label): median seconds and steps to target over seeds, ratio to dense."""
    pairs: dict[tuple[int, str], list[TTARow]] = {}
    for t in tta:
        pairs.setdefault((t.ranks, t.link), []).append(t)
    out: list[dict[str, Any]] = []
    for (ranks, link), group in pairs.items():
        summary = []
        for label, seeds in by_label(group).items():
            times = [t.time_s for t in seeds]
            reached = all(x is not None for x in times) and all(t.error is None for t in seeds)
            steps = [t.steps_to_target or 0 for t in seeds]
            summary.append(
                {
                    "ranks": ranks,
                    "link": link,
                    "label": label,
                    "seeds": len(seeds),
                    "time_s": statistics.median(x or 0.0 for x in times) if reached else None,
                    "steps": statistics.median(steps) if reached else None,
                    "accuracy_cells": accuracy_cells(seeds),
                    "error": next((t.error for t in seeds if t.error), None),
                    "vs_dense": None,
                }
            )
        dense = next((s for s in summary if s["label"] == DENSE), None)
        for s in summary:
            if dense and dense["time_s"] and s["time_s"] is not None:
                s["vs_dense"] = s["time_s"] / dense["time_s"]
        out += summary
    return out


def int8_label(labels: Sequence[str]) -> str | None:
    """The int8 variant: ``uniform:bits=8``, or ``uniform`` where that is its default."""
    if INT8 in labels:
        return INT8
    if "uniform" in labels and commhooks.parse_spec("uniform") == commhooks.parse_spec(INT8):
        return "uniform"
    return None


def _where(r: Row) -> str:
    return f"{r.model}, {r.ranks} ranks, {r.link}"


def row_targets(r: Row, int8: str | None) -> list[tuple[str, float, float | None]]:
    """(what, limit, value) of every target that applies to this row."""
    out: list[tuple[str, float, float | None]] = []
    if r.link == "100mbit" and r.label in ("sign", "ternary", "topk"):
        out.append((f"{r.label} step / dense at 100mbit", 0.15, r.vs_dense))
    if r.link == "100mbit" and r.label == int8:
        out.append(("int8 (uniform bits=8) step / dense at 100mbit", 0.35, r.vs_dense))
    if r.link == "100mbit" and r.label == INT8 + RS:
        out.append(
            ("int8, reduce-scatter transport, at 100mbit (not its default)", 0.35, r.vs_dense)
        )
    if r.label == "powersgd":
        out.append(("our powersgd step / torch's, every link", 1.0, r.vs_torch_powersgd))
        if r.link == "1gbit":
            out.append(("our powersgd step / torch's at 1gbit", 0.8, r.vs_torch_powersgd))
    if r.link == NONE and r.label in commhooks.available():
        out.append(("every compressor at its defaults, unshaped: step / dense", 1.10, r.vs_dense))
    if r.link == NONE and r.label.endswith(FALLBACK):
        out.append(("with fallback=auto, unshaped: step / dense", 1.10, r.vs_dense))
    return out


def targets(rows: list[Row], tta: list[dict[str, Any]], labels: Sequence[str]) -> list[Target]:
    int8 = int8_label(labels)
    out = []
    for r in rows:
        for what, limit, value in row_targets(r, int8):
            out.append(
                Target(what, _where(r), limit, value, None if value is None else value <= limit)
            )
    for s in tta:
        if s["link"] == "100mbit" and s["label"] not in BASELINES:
            v = s["vs_dense"]
            out.append(
                Target(
                    "time to accuracy / dense at 100mbit",
                    f"{s['label']}, {s['ranks']} ranks",
                    0.2,
                    v,
                    None if v is None else v <= 0.2,
                )
            )
    return out


def node_pairs(rows: list[Row]) -> list[tuple[Row, Row, Row | None]]:
    """(flat, hierarchical, compute-only) rows of the same spec, nodes and link."""
    out = []
    for r in rows:
        if r.label.endswith(FLAT):
            spec = r.label[: -len(FLAT)]
            same = [
                x for x in rows if (x.ranks, x.per_node, x.link) == (r.ranks, r.per_node, r.link)
            ]
            hier = next((x for x in same if x.label == spec + HIER), None)
            compute = next((x for x in same if x.label == COMPUTE), None)
            if hier is not None:
                out.append((r, hier, compute))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def node_targets(rows: list[Row]) -> list[Target]:
    """The hierarchical targets: hierarchical against flat, for the same compressor and link."""
    out = []
    for flat, hier, _ in node_pairs(rows):
        spec = flat.label[: -len(FLAT)]
        where = f"{spec}, {flat.ranks // flat.per_node}x{flat.per_node} nodes, {flat.link}"
        b = _ratio(hier.iface_tx_bytes, flat.iface_tx_bytes)
        out.append(Target("inter-node bytes, hierarchical / flat", where, 0.55, b,
                          None if b is None else b <= 0.55))  # fmt: skip
        bound = (spec, flat.link) in LINK_BOUND
        limit = 0.7 if bound else 1.05
        t = _ratio(hier.median_s, flat.median_s)
        what = "step, hierarchical / flat" + (" (link-bound)" if bound else "")
        out.append(Target(what, where, limit, t, None if t is None else t <= limit))
    return out


def node_table(rows: list[Row]) -> list[str]:
    """The "Nodes" section: flat and hierarchical side by side."""
    if not rows:
        return []
    lines = [
        "## Nodes x ranks per node: hierarchical against flat",
        "",
        "Ranks of a node share a namespace (loopback, unshaped); only the links between nodes "
        "are shaped. Step ms: min / median / max over reps (slowest rank). Inter-node MB: tx "
        "bytes per node and step on the interfaces. compute: the step under DDP's no_sync().",
        "",
        "| nodes | link | compressor | compute ms | flat ms | hier ms | hier / flat "
        "| flat MB | hier MB | hier / flat bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for flat, hier, compute in node_pairs(rows):
        spec = flat.label[: -len(FLAT)]

        def ms(r: Row | None) -> str:
            if r is None or r.error:
                return "error" if r is not None else "-"
            return f"{_ms(r.min_s)} / **{_ms(r.median_s)}** / {_ms(r.max_s)}"

        lines.append(
            f"| {flat.ranks // flat.per_node}x{flat.per_node} | {flat.link} | {spec} | "
            f"{_ms(compute.median_s) if compute else '-'} | {ms(flat)} | {ms(hier)} | "
            f"{_f(_ratio(hier.median_s, flat.median_s))} | {_mb(flat.iface_tx_bytes)} | "
            f"{_mb(hier.iface_tx_bytes)} | {_f(_ratio(hier.iface_tx_bytes, flat.iface_tx_bytes))} |"
        )
    dense = [r for r in rows if r.label == DENSE and r.median_s]
    for r in dense:
        lines.append("")
        lines.append(
            f"dense (DDP, no hook), {r.ranks // r.per_node}x{r.per_node} nodes, {r.link}: "
            f"{_ms(r.median_s)} ms, {_mb(r.iface_tx_bytes)} MB per node and step."
        )
    return [*lines, ""]


def _f(x: float | None, fmt: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _ms(x: float | None) -> str:
    return _f(None if x is None else 1e3 * x, ".1f")


def _mb(x: float | None) -> str:
    return _f(None if x is None else x / 1e6, ".4f")


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def markdown(
    cfg: Config,
    rows: list[Row],
    tta: list[dict[str, Any]],
    tgts: list[Target],
    runs: list[dict[str, Any]],
    wall: float,
    node_rows: list[Row] | None = None,
) -> str:
    pairs = [(n, link) for n in cfg.ranks for link in cfg.links]
    lines = [*node_table(node_rows or []), "## Step time / dense (median of interleaved reps)", ""]
    for name in cfg.models if pairs else ():
        lines += [
            f"**{name}**: {describe(name, cfg)}, batch {cfg.batch} per rank.",
            "",
            "| variant | EF | " + " | ".join(f"{n} ranks {link}" for n, link in pairs) + " |",
            "|---|---|" + "---|" * len(pairs),
        ]
        for label in dict.fromkeys(r.label for r in rows if r.model == name):
            cells = []
            ef: bool | None = None
            for n, link in pairs:
                r = next(
                    (r for r in rows if row_key(r) == (name, n, link) and r.label == label), None
                )
                if r is not None and r.error_feedback is not None:
                    ef = r.error_feedback
                cells.append(
                    "-"
                    if r is None
                    else "error"
                    if r.error
                    else _f(r.vs_dense) + (" (1/rep)" if r.slow else "")
                )
            efs = "" if ef is None else ("on" if ef else "off")
            lines.append(f"| {label} | {efs} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "(1/rep): one timed step per rep (its build step took over "
        f"{cfg.slow_s:g} s), else {cfg.warmup} warm-up + {cfg.steps} timed. error: see the "
        "details.",
        "",
        "## Targets",
        "",
        "| target | where | limit | value | met |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t.what} | {t.where} | ≤{t.limit:g} | {_f(t.value)} | {_met(t.met)} |" for t in tgts
    ]
    met = [t.met for t in tgts if t.met is not None]
    lines += ["", f"{sum(met)} of {len(met)} met ({len(tgts) - len(met)} not measurable).", ""]
    if tta:
        lines += [
            f"## Time to accuracy: digits, test accuracy ≥ {cfg.tta_target:g}%",
            "",
            f"MLP 64-{cfg.tta_hidden}-{cfg.tta_hidden}-10, IID split, batch {cfg.batch} per "
            f"rank, SGD lr {cfg.tta_lr:g} momentum 0.9; at most {cfg.tta_max_steps} steps or "
            f"{cfg.tta_max_s:g} s of training; {cfg.tta_seeds} seed(s), median.",
            "",
            "| ranks | link | variant | s to target | / dense | steps to target "
            "| last acc % (mean) | min / max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in tta:
            t = "error" if s["error"] else _f(s["time_s"], ".2f", "not reached")
            lines.append(
                f"| {s['ranks']} | {s['link']} | {s['label']} | {t} | {_f(s['vs_dense'])} | "
                f"{_f(s['steps'], '.0f', '-')} | {s['accuracy_cells']} |"
            )
        lines.append("")
    lines += [
        "## Details: step time and wire bytes per rank and step",
        "",
        "Wire: handed to collectives (hook: our CommStats; analytic: from the parameters). "
        "Link est.: what that implies on the link for ring collectives. Interface: measured tx "
        "bytes over one window of the variant's steps, mean over the namespaces' interfaces.",
        "",
        "| model | ranks | link | variant | step ms (median) | min / max | steps/rep | / dense "
        "| / torch-powersgd | wire MB | source | link est. MB | interface tx MB "
        "| interface / est. | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    int8 = int8_label(cfg.variants)
    for r in rows:
        if r.error:
            lines.append(
                f"| {r.model} | {r.ranks} | {r.link} | {r.label} | error: "
                f"{r.error.replace('|', '/')[:120]} |" + " |" * 10
            )
            continue
        tcell = "; ".join(
            f"≤{limit:g}: {_met(None if v is None else v <= limit)}"
            for _, limit, v in row_targets(r, int8)
        )
        if r.fallback:
            tcell = f"{tcell} ({r.fallback})" if tcell else f"({r.fallback})"
        lines.append(
            f"| {r.model} | {r.ranks} | {r.link} | {r.label} | {_ms(r.median_s)} | "
            f"{_ms(r.min_s)} / {_ms(r.max_s)} | "
            f"{r.steps} | {_f(r.vs_dense)} | {_f(r.vs_torch_powersgd)} | {_mb(r.wire_bytes)} | "
            f"{r.wire_source} | {_mb(r.link_est_bytes)} | {_mb(r.iface_tx_bytes)} | "
            f"{_f(r.iface_vs_est)} | {tcell} |"
        )
    failed = [f"{r['ranks']} ranks {r['link']}: {r['error']}" for r in runs if r.get("error")]
    lines += [
        "",
        f"gloo over TCP in network namespaces (tc tbf rate shaping, no delay), one rank and one "
        f"thread per namespace, torch {torch.__version__}, {os.cpu_count()} cores. Reps: "
        f"{cfg.reps}, interleaved. Step time: slowest rank's. Total wall time {wall:.0f} s.",
    ]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return "\n".join(lines)
