"""A tiny run of ``benchmarks/fsdp_convergence.py`` (the transformer under FSDP2, 2 gloo ranks
in the reduce-scatter mode): it completes, the losses are finite and below uniform bytes, the
compressed run sends fewer bytes than it was handed and holds the error feedback measured, and
the table is well formed. The full tables are in docs/fsdp.md."""

from __future__ import annotations

import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))

from fsdp_convergence import Config, run, table

LABELS = ["dense", "uniform:bits=4"]


def test_tiny_fsdp_run_trains_and_compresses() -> None:
    cfg = Config(steps=20, warmup=5, eval_batches=2)
    rows = {r.label: r for r in run(LABELS, [0], cfg, nodes=False)}
    assert list(rows) == LABELS
    for label, r in rows.items():
        assert math.isfinite(r.val_loss) and r.val_loss < math.log(256), (label, r.val_loss)
    quant = rows["uniform:bits=4"]
    assert 0 < 5 * quant.wire_bytes < quant.raw_bytes
    # error feedback holds the whole gradient of the compressed tensors per rank
    assert 0.9 * quant.model_bytes < quant.feedback_bytes <= quant.model_bytes
    md = table(list(rows.values()))
    assert md.startswith("| run | transport | val loss min / median / max |")
    assert quant.transport == "reducescatter" and rows["dense"].transport == ""
    assert all(f"| {label} |" in md for label in LABELS)
