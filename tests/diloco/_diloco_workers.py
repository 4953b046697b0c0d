"""Worker bodies for the DiLoCo tests (spawned by ``ranks_runner``): tiny MLPs, a few steps."""

from __future__ import annotations

import functools
import gc
from typing import Any

import torch
import torch.distributed as dist
from _spawn import init
from torch import nn

from commhooks.diloco import DiLoCo
from commhooks.federated import FederatedAverager

NESTEROV = ("SGD", {"lr": 0.8, "momentum": 0.5, "nesterov": True})


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 4),
    )  # fmt: skip


def batch(replica: int, step: int, part: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + 100 * replica + part)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def outer(spec: tuple[str, dict] | None) -> Any:
    if spec is None:
        return None
    name, kwargs = spec
    return functools.partial(getattr(torch.optim, name), **kwargs)


def inner(model: nn.Module, case: dict) -> torch.optim.Optimizer:
    if case.get("adamw"):
        return torch.optim.AdamW(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.05)


def local_step(model: nn.Module, opt: torch.optim.Optimizer, replica: int, step: int) -> None:
    x, y = batch(replica, step)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _finish() -> None:
    dist.barrier()
    gc.collect()  # free gloo objects while the group lives (see ddp_step.py)
    dist.destroy_process_group()


def diloco_run(model: nn.Module, case: dict, rank: int) -> dict[str, Any]:
    """Train with DiLoCo from ``case['first']`` to ``case['steps']``, saving or loading a
    checkpoint where asked; record the parameters after each step and the stats."""
    opt = inner(model, case)
    dl = DiLoCo(model, opt, outer_optimizer=outer(case.get("outer")), **case["diloco"])
    if "load" in case:
        saved = torch.load(case["load"].format(rank=rank), weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        dl.load_state_dict(saved["diloco"])
    res: dict[str, Any] = {"params": []}
    for step in range(case.get("first", 0), case["steps"]):
        local_step(model, opt, rank, step)
        if step == case.get("nan_step") and rank == 1:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        if step == case.get("nan_step"):
            res["residuals_before"] = _residuals(dl)
        dl.step()
        if step == case.get("nan_step"):
            res["residuals_after"] = _residuals(dl)
        res["params"].append(flat(model))
        if case.get("save_at") == step + 1:
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "diloco": dl.state_dict(),
            }
            torch.save(state, case["save"].format(rank=rank))
    res["stats"] = dl.stats()  # waits for the exchange in flight, if any
    res["global"] = torch.cat([w.detach().reshape(-1) for w in dl.outer.weights])
    return res


def _residuals(dl: DiLoCo) -> dict[str, torch.Tensor]:
    fb = dl.state.feedback
    if fb is None:
        return {}
    return {n: fb.residual(n).clone() for n, _ in dl.params if fb.residual(n) is not None}


def reference_diloco(model: nn.Module, case: dict, rank: int, world: int) -> torch.Tensor:
    """DiLoCo written out with a dense all-reduce: every H steps the mean of
    ``global - local`` goes through a torch optimizer on fp32 global weights."""
    opt = inner(model, case)
    params = list(model.parameters())
    weights = [nn.Parameter(p.detach().clone()) for p in params]
    out = outer(case.get("outer"))(weights)
    h = case["diloco"]["sync_every"]
    for step in range(case["steps"]):
        local_step(model, opt, rank, step)
        if (step + 1) % h == 0:
            with torch.no_grad():
                for w, p in zip(weights, params):
                    delta = w.detach() - p.detach()
                    dist.all_reduce(delta)
                    w.grad = delta / world
                out.step()
                for w, p in zip(weights, params):
                    p.copy_(w)
    return flat(model)


def parameter_averaging(model: nn.Module, case: dict, rank: int, world: int) -> torch.Tensor:
    """Synchronous parameter averaging: a dense all-reduce of the weights after every step."""
    opt = inner(model, case)
    for step in range(case["steps"]):
        local_step(model, opt, rank, step)
        with torch.no_grad():
            for p in model.parameters():
                dist.all_reduce(p.data)
                p.data.div_(world)
    return flat(model)


def federated(model: nn.Module, case: dict, rank: int) -> torch.Tensor:
    """FederatedAverager with full participation and the same outer optimizer."""
    opt = inner(model, case)
    h = case["diloco"]["sync_every"]
    fed = FederatedAverager(
        model, case["diloco"].get("compressor") or "identity", local_steps=h,
        outer_optimizer=outer(case.get("outer")), min_numel=0,
    )  # fmt: skip
    for r in range(case["steps"] // h):
        fed.begin_round()
        for k in range(h):
            local_step(model, opt, rank, r * h + k)
        fed.end_round()
    return flat(model)


def layout_2x2(rank: int, world: int, store: str, out: str, specs: list[str | None]) -> None:
    """2 replicas x 2 DDP ranks: DDP inside a replica ({0, 1}, {2, 3}), DiLoCo across
    ({0, 2}, {1, 3}), once per compressor. With the first, also a reference on ranks 0 and 2:
    one rank per replica training on both of the replica's DDP batches, DiLoCo over {0, 2}."""
    init(rank, world, store)
    replicas = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    across = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    replica, part = divmod(rank, 2)
    results = []
    for spec in specs:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model, process_group=replicas[replica])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        kw = {"sync_every": 3, "compressor": spec, "outer_optimizer": outer(NESTEROV),
              "min_numel": 0}  # fmt: skip
        dl = DiLoCo(ddp, opt, process_group=across[part], **kw)
        for step in range(STEPS_2X2):
            x, y = batch(replica, step, part)
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            dl.step()
        res: dict[str, Any] = {"params": flat(model), "stats": dl.stats()}
        if part == 0 and spec is specs[0]:
            res["reference"] = _one_rank_replicas(across[0], replica, kw)
        results.append(res)
    torch.save(results, out)
    _finish()


STEPS_2X2 = 6


def _one_rank_replicas(group: dist.ProcessGroup, replica: int, kw: dict) -> torch.Tensor:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dl = DiLoCo(model, opt, process_group=group, **kw)
    for step in range(STEPS_2X2):
        xs, ys = zip(*(batch(replica, step, p) for p in range(2)))
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        dl.step()
    return flat(model)


BAD = {
    "sync_every": {"sync_every": 0},
    "fragments": {"sync_every": 20, "fragments": 9},
    "delay": {"sync_every": 8, "fragments": 2, "delay": 4},
    "outer_optimizer": {"outer_optimizer": "sgd"},
    "outer_optimizer (factory)": {"outer_optimizer": lambda ws: None},
}


def faults(case: dict, rank: int) -> dict[str, Any]:
    """Bad values; ranks that disagree on an option; ranks at different rounds (rank 1
    resumes from an older checkpoint than rank 0). Records each error message."""
    disagree = case["disagree"]
    res: dict[str, Any] = {}
    for name, kwargs in BAD.items():
        model = make_model()
        try:
            DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
            res[name] = None
        except ValueError as e:
            res[name] = str(e)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    try:
        dl = DiLoCo(model, opt, **{**disagree["common"], **disagree["ranks"][rank]})
        for step in range(8):
            local_step(model, opt, rank, step)
            dl.step()
        res["disagree"] = None
    except RuntimeError as e:
        res["disagree"] = str(e)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dl = DiLoCo(model, opt, sync_every=2)
    saved = []
    for step in range(4):
        local_step(model, opt, rank, step)
        dl.step()
        if step % 2 == 1:
            saved.append(dl.state_dict())
    dl = DiLoCo(model, opt, sync_every=2)
    dl.load_state_dict(saved[1 - rank])  # rank 0 at round 2, rank 1 at round 1
    try:
        for step in range(4, 6):
            local_step(model, opt, rank, step)
            dl.step()
        res["rounds"] = None
    except RuntimeError as e:
        res["rounds"] = str(e)
    try:
        DiLoCo(model, opt, sync_every=3).load_state_dict(saved[0])
        res["other options"] = None
    except ValueError as e:
        res["other options"] = str(e)
    return res


RUNNERS = {
    "diloco": lambda m, c, r, w: diloco_run(m, c, r),
    "reference": reference_diloco,
    "averaging": parameter_averaging,
    "federated": lambda m, c, r, w: federated(m, c, r),
    "faults": lambda m, c, r, w: faults(c, r),
}


def cases(rank: int, world: int, store: str, out: str, todo: list[dict]) -> None:
    """Run each case (``kind`` picks the runner) on a fresh copy of the model."""
    init(rank, world, store)
    results = [RUNNERS[c.get("kind", "diloco")](make_model(), c, rank, world) for c in todo]
    torch.save(results, out)
    _finish()
