"""The hook's state across a framework's checkpoints: one side file per rank.

Lightning and the transformers Trainer write their checkpoints from rank 0, but every rank
has its own :class:`~commhooks.ddp.CompressionState` (its error-feedback memory, PowerSGD's
Q; the step counter and stats). Each rank therefore writes its ``state_dict()`` to a file of
its own beside the checkpoint, and reads it back on resume.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Protocol

import torch

from commhooks.comm.collectives import Collectives

__all__ = ["RESTARTS", "HookState", "restore_state", "save_state"]


class HookState(Protocol):
    """What the side files hold: a DDP hook's :class:`~commhooks.ddp.CompressionState` or
    FSDP2's :class:`~commhooks.fsdp.FSDPCompression`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: what a resume without the side files starts again from zero
RESTARTS = (
    "error-feedback memory, the compressor's state (PowerSGD's Q, random generators), the "
    "step counter (so start_iter's dense steps run again) and the stats restart from zero"
)


def save_state(state: HookState, path: str) -> None:
    """Write this rank's ``state.state_dict()`` to ``path`` (its folder created if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state.state_dict(), path)


def restore_state(
    state: HookState, path: str, device: torch.device, checkpoint: str, comm: Collectives
) -> bool:
    """Load this rank's side file ``path`` into ``state``, deciding alike on every rank.

    Every rank says whether it found its file (one small all-gather over ``comm``):
    where all did, each loads its own; where none did (a checkpoint saved without commhooks),
    each warns, naming what restarts from zero, and the state stays fresh. Returns whether
    the state was loaded.

    Args:
        state: this rank's hook state, registered on the DDP module.
        path: this rank's side file.
        device: where the state's tensors live (the model's device).
        checkpoint: the framework's checkpoint, named in the warning and errors.
        comm: every rank that keeps a side file (the DDP hook's group; FSDP2's whole world,
            whose nodes' states differ).

    Raises:
        RuntimeError: on every rank, where only some ranks found their files (another world
            size, or files lost): resuming some ranks' state and not others' would put the
            ranks out of step.
    """
    mine = torch.tensor([int(os.path.isfile(path))], dtype=torch.int64, device=device)
    found = comm.all_gather(mine).tolist()
    if all(found):
        state.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return True
    if not any(found):
        warnings.warn(
            f"commhooks: checkpoint {checkpoint} has no compression state beside it (saved "
            f"without commhooks' per-rank files); {RESTARTS}",
            stacklevel=3,
        )
        return False
    missing = [r for r, f in enumerate(found) if not f]
    raise RuntimeError(
        f"commhooks: checkpoint {checkpoint}: rank(s) {missing} have no compression-state file "
        f"(such as {os.path.basename(path)}) while the others do; resume with the world size "
        "it was saved with, or delete every rank's file to restart compression from zero"
    )
