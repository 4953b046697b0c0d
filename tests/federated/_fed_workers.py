"""Worker bodies for the federated tests (spawned by the ``run_ranks`` fixture)."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from _spawn import init
from torch import nn

from commhooks.federated import FederatedAverager


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def batch(rank: int, round_: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * round_ + 100 * step + rank)
    return torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def local_training(fed: FederatedAverager, model: nn.Module, opt: Any, rank: int, r: int) -> None:
    for step in range(fed.config.local_steps):
        x, y = batch(rank, r, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        fed.correct_gradients()
        opt.step()


def rounds(rank: int, world: int, store: str, out: str, cases: list[dict]) -> None:
    """Run each case's rounds; record params after every round and what tests check."""
    init(rank, world, store)
    results = []
    for case in cases:
        model = make_model()
        if "load" in case:
            saved = torch.load(f"{case['load']}{rank}.pt", weights_only=False)
            model.load_state_dict(saved["model"])
        opt = torch.optim.SGD(model.parameters(), lr=case.get("lr", 0.05))
        fed = FederatedAverager(
            model, case["spec"], num_samples=case.get("samples", [1] * world)[rank],
            **case.get("config", {}),
        )  # fmt: skip
        if "load" in case:
            fed.load_state_dict(saved["fed"])
        first, last = case.get("first", 0), case["rounds"]
        res: dict[str, Any] = {
            "params": [], "participants": [], "residuals": [], "deltas": [], "round_stats": []
        }  # fmt: skip
        for r in range(first, last):
            start = flat(model)
            if fed.begin_round():
                local_training(fed, model, opt, rank, r)
                if r == case.get("nan_round") and rank == 1:
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = float("nan")
            delta = start - flat(model)  # this client's own, unweighted
            everyone = [torch.empty_like(delta) for _ in range(world)]
            dist.all_gather(everyone, delta)
            res["round_stats"].append(fed.end_round())
            res["params"].append(flat(model))
            res["participants"].append(fed.participants(r))
            res["deltas"].append(torch.stack(everyone))
            res["starts"] = [*res.get("starts", []), start]
            fb = fed.state.feedback
            res["residuals"].append(
                {n: fb.residual(n).clone() for n, _ in fed.params if fb.residual(n) is not None}
                if fb is not None
                else {}
            )
            if case.get("save_at") == r + 1:
                torch.save(
                    {"model": model.state_dict(), "fed": fed.state_dict()},
                    f"{case['save']}{rank}.pt",
                )
        res["stats"] = fed.stats()
        results.append(res)
    torch.save(results, out)
    dist.barrier()
    gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
    dist.destroy_process_group()


def dense_sgd(rank: int, world: int, store: str, out: str, steps: int, lr: float) -> None:
    """Plain synchronous data-parallel SGD (DDP), the reference for H = 1."""
    init(rank, world, store)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    for r in range(steps):
        x, y = batch(rank, r, 0)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    torch.save(flat(model), out)
    dist.barrier()
    gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
    dist.destroy_process_group()


def bad_samples(rank: int, world: int, store: str, out: str, samples: list) -> None:
    """Build a weighted averager with per-rank counts; record the error, if any."""
    init(rank, world, store)
    try:
        FederatedAverager(make_model(), "identity", num_samples=samples[rank], weighted=True)
        torch.save("", out)
    except ValueError as e:
        torch.save(str(e), out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def skipped_end_round(rank: int, world: int, store: str, out: str) -> None:
    """Rank 1 begins round 1 but never ends it (it caught its own error, say); record what
    each rank's next exchange raises."""
    init(rank, world, store)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fed = FederatedAverager(model, "topk:ratio=0.1", local_steps=1)
    message = ""
    try:
        for r in range(3):
            fed.begin_round()
            local_training(fed, model, opt, rank, r)
            if not (rank == 1 and r == 1):
                fed.end_round()
    except RuntimeError as e:
        message = str(e)
    torch.save(message, out)
    dist.barrier()
    dist.destroy_process_group()
