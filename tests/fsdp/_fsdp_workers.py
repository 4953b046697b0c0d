"""FSDP2 workers for tests/fsdp: one process launch runs a list of cases, each a fresh model
sharded with ``fully_shard`` (dense, or with commhooks.fsdp.register), trained a few steps on
seeded data; every rank saves its full parameters and gradients per step."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _spawn import init
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, ShardPlacementResult
from torch.distributed.tensor import Shard

import commhooks.fsdp

__all__ = ["build", "run_cases"]

IN, HID, OUT = 16, 64, 8


def model_of(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, HID), nn.ReLU(), nn.Linear(HID, OUT)
    )


def mesh_for(kind: str, world: int) -> Any:
    """``flat``: every rank; ``node``: the ranks of a node (2 per node); ``hsdp``: 2-D."""
    if kind == "flat":
        return init_device_mesh("cpu", (world,))
    if kind == "node":
        return commhooks.fsdp.node_mesh("cpu", ranks_per_node=2)
    return init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))


def build(case: dict[str, Any], world: int) -> tuple[nn.Module, Any]:
    """The model of ``case``, sharded, with its compression state (None for dense)."""
    model = model_of(case.get("seed", 0))
    kw: dict[str, Any] = {"mesh": mesh_for(case.get("mesh", "flat"), world)}
    if case.get("mp"):
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    reshard = case.get("reshard", True)
    for i in (0, 2, 4):
        fully_shard(model[i], reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=reshard, **kw)
    state = None
    if case.get("spec") is not None:
        state = commhooks.fsdp.register(model, case["spec"], **case.get("opts", {}))
    return model, state


def batch(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(8, IN, generator=g), torch.randn(8, OUT, generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def train(
    model: nn.Module, state: Any, case: dict[str, Any], rank: int, start: int, steps: int
) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out: dict[str, Any] = {"params": [], "grads": [], "stats": None, "skipped": [], "ef": []}
    micro = case.get("micro", 1)
    for step in range(start, start + steps):
        for m in range(micro):
            model.set_requires_gradient_sync(m == micro - 1)
            x, y = batch(step, rank, m)
            if case.get("nan_at") == (step, rank, m):
                x = x * float("inf")
            nn.functional.mse_loss(model(x).float(), y).backward()
        grads = {n: full(p.grad) for n, p in model.named_parameters()}
        out["grads"].append(grads)
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        out["skipped"].append(not finite)
        if finite:
            opt.step()
        opt.zero_grad()
        out["params"].append({n: full(p) for n, p in model.named_parameters()})
        if state is not None:
            out["ef"].append(feedback_total(state))
    if state is not None:
        out["stats"] = state.stats()
        out["feedback_bytes"] = state.feedback_bytes()
        out["transport"] = state.engine.transport.name
    return out


def feedback_total(state: Any) -> float:
    """Sum of |residual| over every error-feedback memory of ``state`` (0 without any)."""
    total = 0.0
    for memory in state.engine.memories():
        total += sum(float(t.abs().sum()) for t in memory.state_dict()["residuals"].values())
    return total


def resume(case: dict[str, Any], world: int, rank: int) -> dict[str, Any]:
    """K steps, a checkpoint through torch.distributed.checkpoint, K more; then a fresh
    model and state load the checkpoint and run the same K steps."""
    k, path = case["resume"], case["path"]
    model, state = build(case, world)
    first = train(model, state, case, rank, 0, k)
    dcp.save({"model": model.state_dict(), "comm": state.state_dict()}, checkpoint_id=path)
    straight = train(model, state, case, rank, k, k)
    model2, state2 = build(case, world)
    sd = {"model": model2.state_dict(), "comm": state2.state_dict()}
    dcp.load(sd, checkpoint_id=path)
    model2.load_state_dict(sd["model"])
    state2.load_state_dict(sd["comm"])
    resumed = train(model2, state2, case, rank, k, k)
    return {"first": first, "straight": straight, "resumed": resumed}


def refused(case: dict[str, Any], world: int) -> str:
    """The message of the error ``case["bad"]`` raises at register() or load."""
    bad = case["bad"]
    try:
        if bad == "unsharded":
            commhooks.fsdp.register(model_of(), "uniform")
        elif bad == "hsdp":
            build({**case, "mesh": "hsdp", "spec": "uniform"}, world)
        elif bad == "divide":
            model, _ = build({"mesh": "flat"}, world)
            model[0].set_gradient_divide_factor(3.0)
            commhooks.fsdp.register(model, "uniform")
        elif bad == "groups":
            # Biases on a second mesh: FSDP2 makes two parameter groups of the module.
            model = model_of()
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("a",))
            other = DeviceMesh.from_group(dist.new_group(list(range(world))), "cpu")
            infos = {d: FSDPMeshInfo(m, shard_mesh_dim=0) for d, m in ((1, other), (2, mesh))}

            def placement(p: nn.Parameter) -> ShardPlacementResult:
                return ShardPlacementResult(Shard(0), infos[p.dim()])

            fully_shard(model, mesh=mesh, shard_placement_fn=placement)
            commhooks.fsdp.register(model, "uniform")
        elif bad == "mesh":
            _, state = build({**case, "spec": "uniform"}, world)
            saved = case["saved"]
            state.load_state_dict({"layout": saved, f"rank{dist.get_rank()}": {}})
        elif bad == "other_mesh":
            # Saved through torch.distributed.checkpoint on every rank, loaded on node meshes.
            flat = {"mesh": "flat", "spec": "uniform"}
            model, state = build(flat, world)
            train(model, state, flat, dist.get_rank(), 0, 1)
            dcp.save({"comm": state.state_dict()}, checkpoint_id=case["path"])
            _, state2 = build({"mesh": "node", "spec": "uniform"}, world)
            sd = {"comm": state2.state_dict()}
            dcp.load(sd, checkpoint_id=case["path"])
            state2.load_state_dict(sd["comm"])
        elif bad == "scatter_size":
            # A scatter cuts each tensor into one chunk per rank: 3 elements do not cut in 2.
            _, state = build({**case, "spec": "uniform"}, world)
            step = state.engine.begin()
            try:
                step.submit(["odd"], [torch.zeros(3)], scatter=True)
            finally:
                step.abort()
        elif bad == "flat_on_node":
            build({**case, "mesh": "node", "spec": "uniform", "opts": {"topology": "flat"}}, world)
        elif bad == "coalesce":
            build({**case, "spec": "uniform", "opts": {"coalesce": True}}, world)
        return "no error"
    except ValueError as e:
        return str(e)


def run_cases(rank: int, world: int, store: str, out: str, cases: list[dict[str, Any]]) -> None:
    init(rank, world, store)
    results = []
    for case in cases:
        if "bad" in case:
            results.append(refused(case, world))
        elif "resume" in case:
            results.append(resume(case, world, rank))
        else:
            try:
                model, state = build(case, world)
            except ValueError as e:  # refused at register(): the test reads the message
                results.append(str(e))
                continue
            results.append(train(model, state, case, rank, 0, case.get("steps", 3)))
        dist.barrier()
    torch.save(results, out)
    dist.destroy_process_group()
