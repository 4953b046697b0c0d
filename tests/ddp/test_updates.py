"""Update compression (``commhooks.ddp.compress_updates``) on two gloo ranks: the parameters
stay identical on every rank, the loss falls, the updates are compressed, and a checkpoint
resumes bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _spawn import init
from _workers import batch, make_model
from torch import nn

import commhooks.ddp
from commhooks.ddp import CompressionState
from commhooks.updates import compress_updates_of

# (spec, options): small tensors' gradients averaged in DDP's hook (the default), their
# updates averaged with the rest, or every tensor small (nothing left to send after the hook)
CASES = [
    ("sign", {}),
    ("powersgd:rank=2", {"small_on_gradients": False}),
    ("topk", {"min_numel": 10**9}),
]


def _train(rank: int, case: Any, steps: int, load: Any = None, first: int = 0) -> Any:
    spec, options = case
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = commhooks.ddp.compress_updates(model, opt, spec, **{"min_numel": 64, **options})
    if load is not None:
        model.module.load_state_dict(load[0])
        opt.load_state_dict(load[1])
    losses = []
    for step in range(first, first + steps):
        x, y = batch(rank, step % 4)  # four batches per rank, revisited: the loss must fall
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return model, opt, losses


def _case(rank: int, world: int, case: Any) -> dict[str, Any]:
    model, opt, losses = _train(rank, case, 6)
    saved = ({k: v.clone() for k, v in model.module.state_dict().items()}, opt.state_dict())
    _, _, more = _train(rank, case, 6, load=saved, first=6)  # resumed
    full, full_opt, straight = _train(rank, case, 12)  # uninterrupted
    params = [p.detach().clone() for p in full.parameters()]
    gathered = [torch.cat([p.reshape(-1) for p in params]) for _ in range(world)]
    dist.all_gather(gathered, gathered[0].clone())
    stats = full_opt.stats()
    return {
        "same_on_ranks": all(torch.equal(gathered[0], g) for g in gathered),
        "losses": straight,
        "resumed": losses + more,
        "is_adamw": isinstance(full_opt, torch.optim.AdamW),
        "raw": stats.raw_bytes,
        "wire": stats.wire_bytes,
        "steps": stats.steps,
    }


def _worker(rank: int, world: int, store: str, out: str) -> None:
    init(rank, world, store)
    try:
        torch.save({case[0]: _case(rank, world, case) for case in CASES}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_updates_stay_in_sync_compress_and_resume(run_ranks: Any) -> None:
    for ranks in run_ranks(_worker, 2):
        for spec, _ in CASES:
            r = ranks[spec]
            assert r["same_on_ranks"] and r["is_adamw"], spec
            assert r["steps"] == 12, spec
            if spec == "topk":  # every tensor small: all averaged dense by the hook
                assert r["wire"] == r["raw"] > 0, (r["wire"], r["raw"])
            else:
                assert 0 < r["wire"] < r["raw"] / 2, (spec, r["wire"], r["raw"])
            assert sum(r["losses"][-4:]) < 0.95 * sum(r["losses"][:4]), (spec, r["losses"])
            assert r["resumed"] == r["losses"], spec  # the checkpoint carried moments, residuals


def test_compress_updates_refuses_a_plain_module_and_a_second_wrap() -> None:
    opt = torch.optim.AdamW(make_model().parameters())
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        commhooks.ddp.compress_updates(make_model(), opt, "sign")  # type: ignore[arg-type]
    compress_updates_of(opt, CompressionState("sign"))
    with pytest.raises(ValueError, match="already compressed"):
        compress_updates_of(opt, CompressionState("sign"))
