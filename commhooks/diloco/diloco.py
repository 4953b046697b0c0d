"""The DiLoCo front end: each ``step()`` counts an inner step, sends the fragments due
``delay`` steps from now and applies those due now (see :mod:`commhooks.diloco`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.diloco.config import (
    OUTER_LR,
    OUTER_MOMENTUM,
    DiLoCoConfig,
    DiLoCoStats,
    FragmentStats,
    split_fragments,
)
from commhooks.engine.state import CompressionState
from commhooks.engine.step import StepReport
from commhooks.rounds import (
    InFlight,
    OuterSpec,
    OuterStep,
    agree_round,
    outer_description,
    start_round,
)

__all__ = ["DiLoCo"]

_Result = tuple[list[Tensor] | None, StepReport]


class DiLoCo:
    """Rounds of local steps with compressed pseudo-gradients; see the module docstring.

    Args:
        model: the replica's model (or its DDP wrapper, when a replica is several ranks).
        inner_optimizer: the optimizer that takes the local steps (its state stays local).
        sync_every, fragments, delay, mix, topology: see :class:`DiLoCoConfig`.
        compressor: None (dense fp32 pseudo-gradients) or any spec, config or compressor
            (``"uniform:bits=4"``, ``"topk:ratio=0.02|uniform:bits=2"``), with error feedback
            per replica where the compressor is biased.
        outer_optimizer: None (Nesterov SGD, lr :data:`OUTER_LR`, momentum
            :data:`OUTER_MOMENTUM`), a torch optimizer built over ``model.parameters()``, or
            a factory called with the list of global weights.
        process_group: the replicas' group (None: every rank is a replica).
        backup_device: where the global weights and the outer optimizer's state live
            (default: the CPU, pinned when the model is on CUDA, so they cost no accelerator
            memory).
        hook_options: any other :class:`commhooks.engine.HookOptions` field.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        sync_every: int = 30,
        compressor: str | CompressorConfig | Compressor[Any] | None = None,
        outer_optimizer: OuterSpec = None,
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.0,
        process_group: dist.ProcessGroup | None = None,
        topology: str = "auto",
        backup_device: torch.device | str | None = None,
        **hook_options: Any,
    ) -> None:
        self.config = cfg = DiLoCoConfig(sync_every, fragments, delay, mix, topology)
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"inner_optimizer={type(inner_optimizer).__name__}: must be a torch.optim.Optimizer"
            )
        self.inner_optimizer = inner_optimizer
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: it has no trainable parameters")
        self.fragments = split_fragments([p.numel() for _, p in self.params], cfg.fragments)
        device = torch.device(backup_device) if backup_device is not None else torch.device("cpu")
        default = functools.partial(
            torch.optim.SGD, lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True
        )
        self.outer = OuterStep([p for _, p in self.params], outer_optimizer, default, device)
        self.state = CompressionState(
            compressor if compressor is not None else "identity",
            named_parameters=self.params, process_group=process_group, topology=topology,
            **hook_options,
        )  # fmt: skip
        self.state.comm  # noqa: B018 - every rank binds its group here, at the same point
        names = [[self.params[i][0] for i in frag] for frag in self.fragments]
        layout = hashlib.blake2b(repr(names).encode(), digest_size=8).hexdigest()
        self._agreement = f"{cfg!r}|{outer_description(self.outer.optimizer)}|{layout}"
        self._landings = [t % cfg.sync_every for t in cfg.landings()]
        self.inner_steps = 0
        self.exchanges = 0
        self._pending: dict[int, InFlight | _Result] = {}
        self._failed: str | None = None
        self._stats = DiLoCoStats(fragments=[FragmentStats() for _ in self.fragments])

    # -- the rounds ---------------------------------------------------------------------------

    def step(self) -> None:
        """Count one inner step (call it after ``inner_optimizer.step()``, on every rank):
        apply the fragments due now, and start the exchanges due ``delay`` steps from now."""
        if self._failed is not None:
            raise RuntimeError(self._failed)
        self.inner_steps += 1
        h, delay = self.config.sync_every, self.config.delay
        for f, at in enumerate(self._landings):
            if self.inner_steps % h == at:
                pending = self._pending.pop(f, None)
                self._land(f, self._wait(pending if pending is not None else self._send(f)))
        if delay:
            for f, at in enumerate(self._landings):
                if (self.inner_steps + delay) % h == at:
                    self._pending[f] = self._send(f)

    def _send(self, f: int) -> InFlight:
        """Agree on the round with the other ranks, then start fragment ``f``'s exchange on
        the communication worker."""
        idx = self.fragments[f]
        params = [self.params[i][1] for i in idx]
        device = params[0].device
        with torch.no_grad():
            deltas = [
                self.outer.weights[i].detach().to(device) - p.detach().float()
                for i, p in zip(idx, params)
            ]
        try:
            agree_round(self.state, self.exchanges, "DiLoCo", self._agreement, device)
        except RuntimeError as e:
            self._failed = str(e)  # every rank raised: later exchanges would pair wrongly
            raise
        self.exchanges += 1
        return start_round(self.state, [self.params[i][0] for i in idx], deltas)

    def _wait(self, pending: InFlight | _Result) -> _Result:
        if not isinstance(pending, InFlight):
            return pending  # restored from a checkpoint
        try:
            return pending.result()
        except Exception as e:
            # The exchange failed alike on every rank; later steps would pair wrongly.
            self._failed = str(e)
            raise

    def _land(self, f: int, result: _Result) -> None:
        """Apply fragment ``f``'s averaged pseudo-gradient with the outer optimizer and move
        the local weights to the new global ones (mixed by ``mix``)."""
        means, moved = result
        nonfinite = int(moved.nonfinite)
        idx = self.fragments[f]
        mix = self.config.mix
        with torch.no_grad():
            if means is not None:
                self.outer.step(idx, means)
            for i in idx:
                p = self.params[i][1]
                g = self.outer.weights[i].detach().to(p.device, p.dtype)
                # A skipped sync (some replica's values not finite) resets the local weights
                # to the global ones on every replica, so a replica with inf/nan recovers.
                if mix and means is not None:
                    p.lerp_(g, 1.0 - mix)
                else:
                    p.copy_(g)
        s, fs = self._stats, self._stats.fragments[f]
        s.add(moved)
        s.steps += 1
        s.syncs += 1
        s.nonfinite_steps += nonfinite
        s.last_raw_bytes, s.last_wire_bytes = moved.raw_bytes, moved.wire_bytes
        s.last_link_bytes = moved.link_bytes
        s.last_compress_s, s.last_comm_s = moved.compress_s, moved.comm_s
        s.last_decompress_s = moved.decompress_s
        s.peak_wire_bytes = max(s.peak_wire_bytes, moved.wire_bytes)
        fs.syncs += 1
        fs.skipped += nonfinite
        fs.raw_bytes += moved.raw_bytes
        fs.wire_bytes += moved.wire_bytes
        fs.peak_wire_bytes = max(fs.peak_wire_bytes, moved.wire_bytes)

    # -- public state ---------------------------------------------------------------------------

    def stats(self) -> DiLoCoStats:
        """A copy of this rank's stats (syncs applied so far); waits for the exchanges
        started so far to finish."""
        self.state.worker.drain()
        out = dataclasses.replace(
            self._stats, fragments=[dataclasses.replace(f) for f in self._stats.fragments]
        )
        out.inner_steps = self.inner_steps
        return out

    def state_dict(self) -> dict[str, Any]:
        """Global weights, outer optimizer state, error feedback, counters, stats, and the
        result of any exchange in flight (waited for here), so a run resumed from it, with the
        model's and inner optimizer's state saved at the same step, equals an uninterrupted
        one bit for bit. Call it on every rank at the same step, one file per rank."""
        in_flight = {}
        for f, pending in self._pending.items():
            means, moved = self._pending[f] = self._wait(pending)
            in_flight[f] = {
                "means": None if means is None else [m.clone() for m in means],
                "report": dataclasses.asdict(moved),
            }
        return {
            "config": dataclasses.asdict(self.config),
            "fragments": [[self.params[i][0] for i in frag] for frag in self.fragments],
            "inner_steps": self.inner_steps,
            "exchanges": self.exchanges,
            "outer": self.outer.state_dict(),
            "engine": self.state.state_dict(),
            "in_flight": in_flight,
            "stats": dataclasses.asdict(self._stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (every rank its own)."""
        if state["config"] != dataclasses.asdict(self.config):
            raise ValueError(
                f"state: saved by a DiLoCo with {state['config']}, this one has "
                f"{dataclasses.asdict(self.config)}; resume with the same options"
            )
        names = [[self.params[i][0] for i in frag] for frag in self.fragments]
        if state["fragments"] != names:
            raise ValueError(
                "state: saved for other parameters or another split into fragments; load it "
                "into the model it was saved from"
            )
        for pending in self._pending.values():
            self._wait(pending)  # every rank issued these exchanges: let them finish
        self._pending = {}
        self.outer.load_state_dict(state["outer"])
        self.state.load_state_dict(state["engine"])
        self.inner_steps = int(state["inner_steps"])
        self.exchanges = int(state["exchanges"])
        for f, saved in state["in_flight"].items():
            self._pending[int(f)] = (saved["means"], StepReport(**saved["report"]))
        stats = dict(state["stats"])
        stats["fragments"] = [FragmentStats(**f) for f in stats["fragments"]]
        self._stats = DiLoCoStats(**stats)
        self._failed = None
