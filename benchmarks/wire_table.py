"""Bits per element each compressor puts on the wire, measured on one fixed tensor.

Usage: ``python benchmarks/wire_table.py``. The tensor is 2**20 fp32 N(0, 1) values (seed 0),
viewed as 1024 x 1024 so PowerSGD sees a matrix. ``docs/compressors.md`` quotes these numbers
and ``tests/test_docs.py`` checks that it still does.
"""

from __future__ import annotations

import torch

import commhooks

SPECS = [
    "topk",
    "topk:index_coding=delta",
    "randomk",
    "threshold:threshold=2.5",
    "dgc",
    "uniform",
    "uniform:bits=4",
    "uniform:bits=4,entropy=true",
    "qsgd",
    "qsgd:levels=1",
    "nonuniform",
    "ternary",
    "sign",
    "adaptive",
    "powersgd",
    "powersgd:rank=4",
    "fp16",
    "bf16",
    "topk|uniform:bits=8",
]


def bits_per_element(spec: str) -> float:
    x = torch.randn(2**20, generator=torch.Generator().manual_seed(0)).view(1024, 1024)
    c = commhooks.compressor(spec)
    payload, _ = c.compress(x, "w")
    return 8 * c.nbytes(payload) / x.numel()


def main() -> None:
    for spec in SPECS:
        print(f"| `{spec}` | {bits_per_element(spec):.3f} |")


if __name__ == "__main__":
    main()
