"""Horovod scenarios, run under a real launcher (horovodrun --gloo / --mpi, mpirun) by
test_horovod.py. Each rank writes what it observed to ``OUT/rank{r}.json``; the assertions
live in the tests.

Usage: ``python _hvd_worker.py OUT``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from typing import Any

import horovod.torch as hvd
import torch
from torch import nn

import commhooks
from commhooks.horovod import (
    Compression,
    DistributedOptimizer,
    broadcast_initial_state,
    compress_updates,
)

#: steps of each training run (enough for error feedback, PowerSGD's 3 dense warm-up steps
#: and the replicas check after each)
STEPS = 6


def make_model() -> nn.Module:
    # Two tensors above the default min_numel (compressed), the rest batched dense.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + hvd.rank())
    return torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def replicas_equal(model: nn.Module) -> bool:
    mine = flat(model)
    every = hvd.allgather(mine.unsqueeze(0))
    return bool((every == mine).all())


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: range, passes: int = 1
) -> dict[str, Any]:
    equal, losses = True, []
    for step in steps:
        opt.zero_grad()
        for k in range(passes):
            x, y = batch(step * passes + k)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        equal = equal and replicas_equal(model)
    return {"equal": equal, "losses": losses, "finite": bool(torch.isfinite(flat(model)).all())}


def ours(spec: str, model: nn.Module | None = None, **options: Any) -> tuple[nn.Module, Any]:
    model = model or make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = DistributedOptimizer(sgd, model.named_parameters(), compressor=spec, **options)
    return model, opt


def horovods(compression: Any, passes: int = 1) -> tuple[nn.Module, Any]:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = hvd.DistributedOptimizer(
        sgd, model.named_parameters(), compression=compression, backward_passes_per_step=passes
    )
    return model, opt


def every_compressor() -> dict[str, Any]:
    out = {}
    runs = [(s, {}) for s in commhooks.available()]
    runs += [("uniform", {"transport": "reducescatter"}), ("powersgd", {"start_iter": 3})]
    for spec, options in runs:
        model, opt = ours(spec, **options)
        res = train(model, opt, range(STEPS))
        st = opt.stats()
        label = spec + "".join(f" {k}={v}" for k, v in options.items())
        out[label] = {
            **res,
            "ratio": st.ratio,
            "steps": st.steps,
            "transport": opt.compression_state.transport.name,
            "isinstance_sgd": isinstance(opt, torch.optim.SGD),
        }
    return out


def lossless() -> dict[str, Any]:
    ref_model, ref_opt = horovods(hvd.Compression.none)
    train(ref_model, ref_opt, range(STEPS))
    ref = flat(ref_model)
    out = {}
    for spec in ("identity", "topk:ratio=1.0"):
        model, opt = ours(spec, error_feedback=False, min_ratio=0.0)
        train(model, opt, range(STEPS))
        out[spec] = (flat(model) - ref).abs().max().item()
    # backward_passes_per_step=2 accumulates locally like Horovod's.
    ref_model, ref_opt = horovods(hvd.Compression.none, passes=2)
    train(ref_model, ref_opt, range(STEPS), passes=2)
    model, opt = ours("identity", backward_passes_per_step=2)
    train(model, opt, range(STEPS), passes=2)
    out["identity, 2 passes"] = (flat(model) - flat(ref_model)).abs().max().item()
    return out


def adapters() -> dict[str, Any]:
    out = {}
    pairs = {
        "fp16": (Compression.fp16, hvd.Compression.fp16),
        "none": (Compression.none, hvd.Compression.none),
        "randomk:ratio=1.0": (Compression.randomk(ratio=1.0), hvd.Compression.none),
    }
    for label, (mine, theirs) in pairs.items():
        a, a_opt = horovods(mine)
        train(a, a_opt, range(STEPS))
        b, b_opt = horovods(theirs)
        train(b, b_opt, range(STEPS))
        out[label] = (flat(a) - flat(b)).abs().max().item()
    model, opt = horovods(Compression.randomk(ratio=0.25))
    out["randomk:ratio=0.25"] = train(model, opt, range(STEPS))
    return out


def updates() -> dict[str, Any]:
    """AdamW whose updates, not gradients, are averaged through sign with error feedback."""
    model = make_model()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = compress_updates(adam, "sign", model.named_parameters())
    res = train(model, opt, range(STEPS))
    st = opt.stats()
    return {**res, "ratio": st.ratio, "steps": st.steps, "is_adamw": opt is adam}


def updates_topk() -> dict[str, Any]:
    """Top-k 1% on AdamW's updates: the default sparsity warm-up is on, and still keeping
    more than 1% at step STEPS of 30."""
    model = make_model()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = compress_updates(adam, "topk:ratio=0.01", model.named_parameters())
    res = train(model, opt, range(STEPS))
    ef = opt.compression_state.feedback
    return {**res, "warmup": (ef.config.warmup_steps, ef.config.warmup_ratio),
            "ratio_now": ef.compressor.config.ratio}  # fmt: skip


def checkpoint() -> dict[str, Any]:
    model, opt = ours("topk:ratio=0.05")
    train(model, opt, range(STEPS))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, range(STEPS, 2 * STEPS))
    fresh = make_model()
    fresh.load_state_dict(saved_model)
    fresh, fresh_opt = ours("topk:ratio=0.05", model=fresh)
    fresh_opt.load_state_dict(saved_opt)
    train(fresh, fresh_opt, range(STEPS, 2 * STEPS))
    memory = saved_opt["commhooks"]["feedback"]
    return {
        "resumed_equal": bool(torch.equal(flat(model), flat(fresh))),
        "has_feedback": memory is not None and len(memory.get("memory", memory)) > 0,
        "iteration": saved_opt["commhooks"]["iteration"],
    }


def api() -> dict[str, Any]:
    out: dict[str, Any] = {}
    # synchronize() then step() under skip_synchronize() (gradient clipping) equals step().
    a, a_opt = ours("sign")
    train(a, a_opt, range(3))
    b, b_opt = ours("sign")
    for step in range(3):
        b_opt.zero_grad()
        x, y = batch(step)
        nn.functional.mse_loss(b(x), y).backward()
        b_opt.synchronize()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1e9)
        with b_opt.skip_synchronize():
            b_opt.step()
    out["skip_synchronize_equal"] = bool(torch.equal(flat(a), flat(b)))
    # zero_grad() between backward and step() would drop the exchange: refused.
    c, c_opt = ours("topk")
    x, y = batch(0)
    nn.functional.mse_loss(c(x), y).backward()
    try:
        c_opt.zero_grad()
        out["zero_grad_error"] = ""
    except RuntimeError as e:
        out["zero_grad_error"] = str(e)
    c_opt.step()
    # Initial state from rank 0, whatever each rank started with.
    torch.manual_seed(hvd.rank())
    d = nn.Linear(8, 8)
    d_opt = DistributedOptimizer(torch.optim.Adam(d.parameters()), d.named_parameters())
    broadcast_initial_state(d.state_dict(), d_opt)
    out["broadcast_equal"] = replicas_equal(d)
    out["broadcast_iteration"] = d_opt.compression_state.iteration
    # Bad arguments are refused before any collective, naming the field.
    bad = {
        "op": {"op": hvd.Adasum},
        "backward_passes_per_step": {"backward_passes_per_step": 0},
        "named_parameters": {"named_parameters": list(d.named_parameters())[:1]},
        "ratio": {"compressor": "topk:ratio=2"},
        "fallback": {"fallback": "auto"},
    }
    out["bad"] = {}
    for field, kwargs in bad.items():
        e_model = nn.Linear(8, 8)
        kwargs.setdefault("named_parameters", e_model.named_parameters())
        try:
            DistributedOptimizer(torch.optim.SGD(e_model.parameters(), lr=0.1), **kwargs)
            out["bad"][field] = ""
        except ValueError as e:
            out["bad"][field] = str(e)
    return out


def overlap() -> dict[str, Any]:
    """The exchanges start from the gradient hooks during backward: with the worker held up,
    every bucket has started (and none finished) when backward returns; the result still
    equals Horovod's uncompressed optimizer."""
    model, opt = ours("identity", error_feedback=False, bucket_cap_mb=0.0001)
    gate = threading.Event()
    opt.compression_state.worker.submit(lambda: gate.wait(30))
    opt.zero_grad()
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    out: dict[str, Any] = {
        "buckets": len(opt._buckets),
        "started": len(opt._started),
        "pending": all(not f.done() for f in opt._started),
    }
    gate.set()
    opt.step()
    train(model, opt, range(1, STEPS))
    ref, ref_opt = horovods(hvd.Compression.none)
    train(ref, ref_opt, range(STEPS))
    out["diff"] = (flat(model) - flat(ref)).abs().max().item()
    return out


def conventions() -> dict[str, Any]:
    """What Horovod users pass as ``compression=``: our specs, and hvd.Compression's members."""
    out: dict[str, Any] = {}
    kinds = {
        "topk:ratio=0.01": "topk:ratio=0.01",
        "hvd.Compression.fp16": hvd.Compression.fp16,
        "hvd.Compression.none": hvd.Compression.none,
    }
    for label, compression in kinds.items():
        model = make_model()
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = DistributedOptimizer(sgd, model.named_parameters(), compression=compression)
        res = train(model, opt, range(3))
        out[label] = {
            "spec": opt.compression_state.compressor.config.name,
            "equal": res["equal"],
            "ratio": opt.stats().ratio,
        }
    model = make_model()
    try:
        DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            compressor="sign",
            compression=hvd.Compression.fp16,
        )
        out["both"] = ""
    except ValueError as e:
        out["both"] = str(e)
    return out


def mismatch() -> str:
    ratio = 0.01 if hvd.rank() == 0 else 0.02
    model, opt = ours(f"topk:ratio={ratio}")
    try:
        train(model, opt, range(2))
    except RuntimeError as e:
        return str(e)
    return ""


class _Mixed(nn.Module):
    """Float32 layers around a float64 one: its buckets are exchanged apart."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64).double()
        self.c = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)).double())).float())


def nan_step() -> dict[str, Any]:
    """A mixed-dtype model in many small buckets; at step 2 rank 1's first-layer gradient gets
    one NaN. Every rank sees a non-finite average and skips the step (as GradScaler does), and
    the error feedback, which the buckets exchanged before the NaN's fed, is as it was."""
    model = _Mixed()
    _, opt = ours("topk:ratio=0.1", model=model, bucket_cap_mb=0.001, min_numel=0)
    armed = [False]
    model.a.weight.register_hook(
        lambda g: g.index_fill(0, torch.tensor([0]), float("nan"))
        if armed[0] and hvd.rank() == 1 else g
    )  # fmt: skip
    out: dict[str, Any] = {"finite": [], "ef": [], "buckets": len(opt._buckets)}
    for step in range(5):
        opt.zero_grad()
        armed[0] = step == 2
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.synchronize()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if finite:
            with opt.skip_synchronize():
                opt.step()
        out["finite"].append(finite)
        residuals = opt.compression_state.state_dict()["feedback"]["residuals"]
        out["ef"].append([float(residuals[k].double().abs().sum()) for k in sorted(residuals)])
    out["nonfinite_steps"] = opt.stats().nonfinite_steps
    out["equal"] = replicas_equal(model)
    return out


def main() -> None:
    out_dir = sys.argv[1]
    hvd.init()
    torch.set_num_threads(1)
    result = {
        "size": hvd.size(),
        "steps_per_run": STEPS,
        "every_compressor": every_compressor(),
        "lossless": lossless(),
        "adapters": adapters(),
        "checkpoint": checkpoint(),
        "updates": updates(),
        "updates_topk": updates_topk(),
        "api": api(),
        "mismatch": mismatch(),
        "overlap": overlap(),
        "conventions": conventions(),
        "nan_step": nan_step(),
    }
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
