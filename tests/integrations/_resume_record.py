"""What the framework resume workers record of each run, for the tests to compare."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def resume_record(model: Any, state: Any, seen: list[Any]) -> dict[str, Any]:
    """The parameters, the hook's step counter and stats, and the commhooks warnings the run
    raised (``warnings.catch_warnings(record=True)``)."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "iteration": state.iteration,
        "stats": state.stats(),
        "warnings": [str(w.message) for w in seen if "commhooks" in str(w.message)],
    }


def run_lightning_resume(fit: Callable[..., dict[str, Any]], steps: int) -> None:
    """The Lightning resume scenario: a straight fit with checkpoints (and which side files
    they left), a fit resumed from the mid-run one, and one resumed from it with this rank's
    side file removed; each rank saves the three records as ``result<rank>.pt`` under the
    directory named by ``sys.argv[1]``. ``fit(out, steps, every=..., ckpt=...)`` runs one."""
    torch.set_num_threads(1)
    out = sys.argv[1]
    ckpt = os.path.join(out, f"epoch=0-step={steps // 2}.ckpt")
    result = {"straight": fit(out, steps, every=steps // 2)}
    rank = dist.get_rank()
    result["sides"] = sorted(f for f in os.listdir(out) if "commhooks-rank" in f)
    result["resumed"] = fit(out, steps, ckpt=ckpt)
    dist.barrier()
    os.remove(f"{ckpt}.commhooks-rank{rank}.pt")  # a checkpoint saved without the hook state
    dist.barrier()
    result["bare"] = fit(out, steps, ckpt=ckpt)
    torch.save(result, os.path.join(out, f"result{rank}.pt"))
