"""Worker: count host reads of device values during compressed steps (spawned by the tests)."""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
from typing import Any

import torch
import torch.distributed as dist
from _spawn import init
from torch.overrides import TorchFunctionMode

from commhooks.engine import CompressionState, average_flat

#: the Tensor methods that copy a device value to the host
READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class CountReads(TorchFunctionMode):
    """Counts each host read by the file and line that asked for it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in READS:
            frame = traceback.extract_stack()[-3]
            self.reads[f"{os.path.basename(frame.filename)}:{frame.lineno} {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def count_reads(
    rank: int,
    world: int,
    store_path: str,
    out: str,
    specs: list[str],
    options: dict[str, Any],
    kernels: str = "auto",
) -> None:
    """Per spec: the host reads of its third compressed step (the first two set up per-shape
    probes, the config check and the error-feedback memory), and whether it compressed.
    ``options``: more hook options (the topology). ``kernels``: ``COMMHOOKS_KERNELS``
    (``"triton"``: the device kernels, in Triton's interpreter on these CPU tensors)."""
    os.environ["COMMHOOKS_KERNELS"] = kernels
    init(rank, world, store_path)
    try:
        params = [torch.nn.Parameter(torch.randn(256, 128)), torch.nn.Parameter(torch.randn(128)),
                  torch.nn.Parameter(torch.randn(64, 300))]  # fmt: skip
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        result = {}
        for spec in specs:
            state = CompressionState(
                spec, named_parameters=named, nonfinite_check="device", **options
            )
            gen = torch.Generator().manual_seed(rank)
            keys, shapes = [n for n, _ in named], [p.shape for p in params]
            for i in range(3):
                buf = torch.randn(sum(p.numel() for p in params), generator=gen)
                mode = CountReads() if i == 2 else contextlib.nullcontext()
                with mode:
                    # On this thread, so the mode sees every read.
                    step = state.begin()
                    average_flat(step, buf, keys, shapes)
                    step.close()
            st = state.stats()
            reads = dict(mode.reads) if isinstance(mode, CountReads) else {}
            result[spec] = {"reads": reads, "ratio": st.ratio, "layout": state.layout}
        torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def overflow_rolls_back(rank: int, world: int, store_path: str, out: str) -> None:
    """fp16 gradients whose compensated values overflow fp16 on their way to the wire (every
    input is finite, so only the averages show it): device mode must roll the step back."""
    init(rank, world, store_path)
    try:
        params = [torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.float16))]
        state = CompressionState("randomk:ratio=0.1", named_parameters=[("w", params[0])],
                                 nonfinite_check="device", min_numel=0)  # fmt: skip
        grad = torch.full((64 * 64,), 4.0e4, dtype=torch.float16)
        step = state.begin()
        average_flat(step, grad.clone(), ["w"], [params[0].shape])  # residual: 4e4 where not sent
        step.close()
        before = state.feedback.residual("w").clone()
        out_grad = grad.clone()
        step = state.begin()
        average_flat(
            step, out_grad, ["w"], [params[0].shape]
        )  # g + e = 8e4 > 65504: inf where sent
        step.close()
        after = state.feedback.residual("w").clone()
        torch.save({"same": bool(torch.equal(before, after)),
                    "finite": bool(torch.isfinite(after).all()),
                    "marked": not bool(torch.isfinite(out_grad).all()),
                    "nonfinite_steps": state.stats().nonfinite_steps}, out)  # fmt: skip
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gathered_overflow_rolls_back(
    rank: int, world: int, store_path: str, out: str, specs: list[str], options: dict[str, Any]
) -> None:
    """Per spec over a gathering transport in device mode: a step where rank 0 has a NaN
    leaves every rank's error feedback (client and server side) as it was, and marks the
    averages non-finite; the next step compresses again."""
    init(rank, world, store_path)
    try:
        params = [torch.nn.Parameter(torch.randn(256, 128)), torch.nn.Parameter(torch.randn(128))]
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        keys, shapes = [n for n, _ in named], [p.shape for p in params]
        n = sum(p.numel() for p in params)
        result = {}
        for spec in specs:
            state = CompressionState(
                spec, named_parameters=named, nonfinite_check="device", **options
            )
            gen = torch.Generator().manual_seed(rank)
            for _ in range(2):
                step = state.begin()
                average_flat(step, torch.randn(n, generator=gen), keys, shapes)
                step.close()
            before = [m.state_dict()["residuals"] for m in state.memories()]
            buf = torch.randn(n, generator=gen)
            if rank == 0:
                buf[7] = float("nan")
            step = state.begin()
            average_flat(step, buf, keys, shapes)
            step.close()
            after = [m.state_dict()["residuals"] for m in state.memories()]
            same = all(
                a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                for a, b in zip(before, after)
            )
            step = state.begin()
            buf = torch.randn(n, generator=gen)
            average_flat(step, buf, keys, shapes)
            step.close()
            result[spec] = {
                "same": same,
                "nonfinite_steps": state.stats().nonfinite_steps,
                "then_finite": bool(torch.isfinite(buf).all()),
            }
        torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
