"""Federated rounds over torch.distributed: local SGD with compressed model deltas.

Every rank is a client. Each round, the sampled clients run ``local_steps`` optimizer steps,
then every rank sends its (error-compensated, compressed) model delta through the same
transports as the DDP hook; the aggregated delta is applied alike on every rank, so replicas
stay identical. Clients left out of a round send zeros, with weight 0, and their
error-feedback memory waits for their next round.

    fed = FederatedAverager(model, "topk:ratio=0.01", local_steps=10, participation=0.5)
    for r in range(rounds):
        if fed.begin_round():                 # this client was sampled
            for x, y in local_batches(10):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                fed.correct_gradients()       # FedProx / SCAFFOLD terms, if enabled
                opt.step()
        fed.end_round()                       # every rank calls it: it is collective

Each exchange first checks that every rank is at the same round with the same options, and
raises on every rank otherwise. The aggregated delta is applied by an outer optimizer (FedAvg's
plain step, FedAvgM's server momentum, or any torch optimizer, such as DiLoCo's Nesterov SGD).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from commhooks._validate import check_bool, check_int, check_real
from commhooks.comm.transport import Traffic
from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.engine.options import HookOptions
from commhooks.engine.state import CommStats, CompressionState
from commhooks.rounds import OuterSpec, OuterStep, agree_round, average_round, outer_description

__all__ = ["FedConfig", "FedStats", "FederatedAverager"]

logger = logging.getLogger(__name__)

#: the :class:`HookOptions` fields, which :class:`FedConfig` also takes as keywords
HOOK_OPTIONS = tuple(f.name for f in dataclasses.fields(HookOptions))


@dataclass(frozen=True, init=False)
class FedConfig:
    """How rounds run.

    Tuned often:
        local_steps: H, the optimizer steps each sampled client takes per round. More steps
            mean fewer, larger messages, and more client drift on non-IID data.
        participation: fraction of clients sampled per round, in (0, 1]; at least one. The
            sample comes from ``(seed, round)``, so every rank draws the same.
        server_lr: scales the aggregated delta (1.0: FedAvg).
        server_momentum: FedAvgM's server momentum on the aggregated delta (0: none). These
            two build the default outer optimizer, ``torch.optim.SGD(lr=server_lr,
            momentum=server_momentum)``; give :class:`FederatedAverager` an
            ``outer_optimizer`` for any other.

    Drift control:
        prox_mu: FedProx: :meth:`FederatedAverager.correct_gradients` adds
            ``prox_mu * (w - w_round_start)`` to each gradient. 0.01-1.0.
        scaffold: SCAFFOLD control variates (option II): gradients get ``c - c_i`` added,
            and the variates' changes are compressed and exchanged like the deltas. Needs
            ``local_lr``.
        local_lr: the clients' learning rate, for SCAFFOLD's variate update.

    Tuned seldom:
        weighted: weight each client's delta by its sample count (give ``num_samples``).
        seed: seeds the client sampling and the compressors' rank-local randomness (the
            hook options' ``seed``).
        hook: the engine's options for each client's exchange, a
            :class:`commhooks.ddp.HookOptions`; or give its fields as keywords here:
            ``error_feedback`` (``"auto"``: per-client residuals for biased compressors),
            ``transport``, ``min_numel``, ``min_ratio``, ... Exchanges are always flat:
            each client's delta and memory are its own, so ``topology`` is refused.

    Keywords only: ``FedConfig(local_steps=10, min_numel=0)``.
    """

    local_steps: int = 1
    participation: float = 1.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    prox_mu: float = 0.0
    scaffold: bool = False
    local_lr: float | None = None
    weighted: bool = False
    seed: int = 0
    hook: HookOptions = dataclasses.field(default_factory=HookOptions)

    def __init__(self, *, hook: HookOptions | None = None, **options: Any) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        own = {k: v for k, v in options.items() if k in fields}
        rest = {k: v for k, v in options.items() if k not in fields}
        if hook is not None and rest:
            raise ValueError(f"hook: pass a HookOptions or its fields ({sorted(rest)}), not both")
        if hook is not None and not isinstance(hook, HookOptions):
            raise ValueError(f"hook={hook!r}: must be a HookOptions")
        if "topology" in rest or (hook is not None and hook.topology != "auto"):
            raise ValueError(
                "topology: federated exchanges are flat (each client's delta and error-feedback "
                "memory are its own); leave it out"
            )
        unknown = sorted(set(rest) - set(HOOK_OPTIONS))
        if unknown:
            raise TypeError(f"FedConfig: unexpected keyword arguments {unknown}")
        for name, f in fields.items():
            if name != "hook":
                object.__setattr__(self, name, own.get(name, f.default))
        object.__setattr__(self, "hook", hook if hook is not None else HookOptions(**rest))
        self.__post_init__()

    def __post_init__(self) -> None:
        check_int("local_steps", self.local_steps, lo=1)
        check_real("participation", self.participation, 0.0, 1.0, lo_open=True)
        check_real("server_lr", self.server_lr, lo=0.0, lo_open=True)
        check_real("server_momentum", self.server_momentum, 0.0, 1.0, hi_open=True)
        check_real("prox_mu", self.prox_mu, lo=0.0)
        check_bool("scaffold", self.scaffold)
        if self.scaffold and self.local_lr is None:
            raise ValueError("local_lr: SCAFFOLD needs the clients' learning rate")
        if self.local_lr is not None:
            check_real("local_lr", self.local_lr, lo=0.0, lo_open=True)
        check_bool("weighted", self.weighted)
        check_int("seed", self.seed)

    def __getattr__(self, name: str) -> Any:
        # The hook options given as keywords read back as attributes (``cfg.min_numel``).
        if name in HOOK_OPTIONS and name != "topology":
            return getattr(self.hook, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def hook_options(self) -> HookOptions:
        """The options each client's :class:`CompressionState` is built with: :attr:`hook`,
        flat, with this config's ``seed``."""
        return dataclasses.replace(self.hook, topology="flat", seed=self.seed)


@dataclass
class FedStats(CommStats):
    """:class:`CommStats` of this client, plus its rounds. ``uplink_bytes`` counts only the
    rounds it took part in (absent clients still join the collectives with empty deltas,
    which a deployment would not send); ``wire_bytes`` counts everything handed over. The
    ``last_*`` fields and :attr:`last_ratio` hold the last round (deltas and, with SCAFFOLD,
    control variates together)."""

    rounds: int = 0
    participated: int = 0
    uplink_bytes: int = 0


class FederatedAverager:
    """Round-based compressed averaging of a model's parameters; see the module docstring.

    Args:
        model: the model every rank trains (not wrapped in DDP).
        compressor: a spec string, config or compressor, as everywhere in commhooks.
        config: a :class:`FedConfig`; or give its fields as keyword arguments.
        num_samples: this client's sample count, for ``weighted``.
        process_group: the group (None: the default group).
        outer_optimizer: what applies the aggregated delta to the round's starting weights,
            as the gradient of one step: None (SGD with ``server_lr`` and
            ``server_momentum``), a torch optimizer built over ``model.parameters()`` (it is
            pointed at fp32 copies, the global weights), or a factory called with the list of
            global weights, e.g. ``functools.partial(torch.optim.SGD, lr=1.0, momentum=0.5,
            nesterov=True)`` (DiLoCo's outer step).
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: str | CompressorConfig | Compressor[Any],
        config: FedConfig | None = None,
        *,
        num_samples: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        outer_optimizer: OuterSpec = None,
        **kwargs: Any,
    ) -> None:
        if config is not None and kwargs:
            raise ValueError("config: pass a FedConfig or keyword options, not both")
        self.config = cfg = config if config is not None else FedConfig(**kwargs)
        if outer_optimizer is not None and (cfg.server_lr != 1.0 or cfg.server_momentum):
            raise ValueError(
                "outer_optimizer: give it, or server_lr / server_momentum (which build the "
                "default SGD outer step), not both"
            )
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.outer = OuterStep(
            [p for _, p in self.params], outer_optimizer,
            lambda ws: torch.optim.SGD(ws, lr=cfg.server_lr, momentum=cfg.server_momentum),
            self.params[0][1].device if self.params else torch.device("cpu"),
        )  # fmt: skip
        options = cfg.hook_options()
        self.state = CompressionState(
            compressor, named_parameters=self.params, process_group=process_group, options=options
        )
        # SCAFFOLD's variates travel through their own state: their own memory, same keys.
        self.cstate = (
            CompressionState(
                compressor,
                named_parameters=self.params,
                process_group=process_group,
                options=options,
            )
            if cfg.scaffold
            else None
        )
        self.world = self.state.world_size
        self.rank = self.state.rank
        if cfg.weighted:
            # Gathered before any check, so a bad count raises on every rank, not only here.
            ok = isinstance(num_samples, int) and not isinstance(num_samples, bool)
            mine = torch.tensor([num_samples if ok else -1], dtype=torch.int64)
            counts = self.state.comm.all_gather(mine)
            bad = [r for r, n in enumerate(counts.tolist()) if n <= 0]
            if bad:
                raise ValueError(
                    f"num_samples: weighted averaging needs a positive sample count on every "
                    f"rank; rank(s) {bad} gave {num_samples if self.rank in bad else 'one'} "
                    "(a round whose sampled clients all had 0 samples would divide 0 by 0)"
                )
            self._weights = counts.double()
        else:
            self._weights = torch.ones(self.world, dtype=torch.float64)
        self.round = 0
        self._start: list[Tensor] | None = None
        self._participating = False
        self._c = [torch.zeros_like(p, dtype=torch.float32) for _, p in self.params]
        self._ci = [torch.zeros_like(p, dtype=torch.float32) for _, p in self.params]
        self._stats = FedStats()

    # -- the round ----------------------------------------------------------------------------

    def participants(self, round_: int | None = None) -> list[int]:
        """The ranks sampled in a round (default: the current one); the same on every rank."""
        r = self.round if round_ is None else round_
        k = max(1, round(self.config.participation * self.world))
        return sorted(random.Random(f"{self.config.seed}:{r}").sample(range(self.world), k))

    def begin_round(self) -> bool:
        """Remember the round's starting point; return whether this client trains this round."""
        if self._start is not None:
            # The last round was begun and never ended here, but ended on the other ranks:
            # count it, so that this rank's next exchange names the rounds on every rank
            # instead of pairing with the wrong round.
            logger.warning(
                "commhooks: round %d was begun but not ended on this rank; the next "
                "end_round() will find the ranks at different rounds",
                self.round,
            )
            self.round += 1
        self._start = [p.detach().clone() for _, p in self.params]
        self._participating = self.rank in self.participants()
        return self._participating

    def correct_gradients(self) -> None:
        """Add the FedProx and SCAFFOLD terms to the gradients (call after ``backward()``)."""
        if self._start is None:
            raise RuntimeError("correct_gradients: call begin_round() first")
        cfg = self.config
        with torch.no_grad():
            for i, (_, p) in enumerate(self.params):
                if p.grad is None:
                    continue
                if cfg.prox_mu:
                    p.grad.add_(p - self._start[i], alpha=cfg.prox_mu)
                if cfg.scaffold:
                    p.grad.add_((self._c[i] - self._ci[i]).to(p.grad.dtype))

    def end_round(self) -> FedStats:
        """Exchange the deltas and apply their weighted average on every rank (collective)."""
        if self._start is None:
            raise RuntimeError("end_round: call begin_round() first")
        cfg, start = self.config, self._start
        who = self.participants()
        weight = self._weights[who].sum()
        mine = float(self._weights[self.rank] / weight * self.world) if self._participating else 0.0
        agree_round(self.state, self.round, "FederatedAverager", self._agreement, start[0].device)
        everything = range(len(self.params))
        with torch.no_grad():
            # The pseudo-gradient w_start - w, scaled so the transport's mean is the weighted
            # mean over the participants.
            deltas = [(s - p.detach()).float() * mine for (_, p), s in zip(self.params, start)]
            update, moved = self._exchange(self.state, deltas)
            # The average is the same on every rank, so every rank skips a non-finite round
            # alike: parameters back to the round's start, the outer optimizer's state and the
            # control variates untouched, the error-feedback memory rolled back.
            if update is not None:
                self.outer.set_weights(everything, start)
                self.outer.step(everything, update)
                for (_, p), w in zip(self.params, self.outer.weights):
                    p.copy_(w.to(p.device, p.dtype))
                if cfg.scaffold:
                    moved.add(self._scaffold(deltas, mine, len(who)))
            else:
                for (_, p), s in zip(self.params, start):
                    p.copy_(s.to(p.dtype))
                if self.cstate is not None:
                    # Closed every round, exchanged or not, so its step count follows the rounds.
                    self.cstate.begin().close()
        s = self._stats
        s.add(moved)
        s.last_raw_bytes, s.last_wire_bytes = moved.raw_bytes, moved.wire_bytes
        s.last_link_bytes = moved.link_bytes
        s.last_compress_s, s.last_comm_s = moved.compress_s, moved.comm_s
        s.last_decompress_s = moved.decompress_s
        s.steps = s.rounds = s.rounds + 1
        if self._participating:
            s.participated += 1
            s.uplink_bytes += moved.wire_bytes
        self.round += 1
        self._start = None
        return self.stats()

    def _scaffold(self, deltas: list[Tensor], mine: float, sampled: int) -> Traffic:
        """Option II: c_i+ = c_i - c + delta_i / (H lr); c += (1/N) sum over sampled of the
        change in c_i, exchanged compressed like the deltas."""
        lr, h = self.config.local_lr, self.config.local_steps
        assert lr is not None and self.cstate is not None
        changes = []
        for i, d in enumerate(deltas):
            if self._participating:
                raw = d / mine  # undo the weighting: this client's own delta
                new = self._ci[i] - self._c[i] + raw / (h * lr)
                changes.append(new - self._ci[i])
                self._ci[i] = new
            else:
                changes.append(torch.zeros_like(d))
        mean, moved = self._exchange(self.cstate, changes)
        if mean is not None:
            for i in range(len(self._c)):
                self._c[i].add_(mean[i])
        return moved

    def _exchange(
        self, state: CompressionState, tensors: list[Tensor]
    ) -> tuple[list[Tensor] | None, Traffic]:
        """The mean over ranks of ``tensors`` (one per parameter), compressed, or None where
        some rank's was not finite; and the bytes moved (its non-finite step counted)."""
        # An absent client joins with a zero delta and leaves its error-feedback memory alone:
        # its residual waits for its next round.
        keys = [n for n, _ in self.params]
        mean, report = average_round(state, keys, tensors, memory=self._participating)
        self._stats.nonfinite_steps += int(report.nonfinite)
        return mean, report

    @property
    def _agreement(self) -> str:
        """What must agree across ranks besides the compressor and hook options."""
        return f"{self.config!r}|{outer_description(self.outer.optimizer)}"

    # -- public state ---------------------------------------------------------------------------

    def stats(self) -> FedStats:
        """A copy of this client's cumulative stats."""
        return dataclasses.replace(self._stats)

    def state_dict(self) -> dict[str, Any]:
        """Per-client error feedback (deltas and variates), control variates, the outer
        optimizer's state, the round counter (which drives the sampling) and stats. Save at a
        round boundary."""
        return {
            "round": self.round,
            "state": self.state.state_dict(),
            "cstate": self.cstate.state_dict() if self.cstate is not None else None,
            "outer": self.outer.state_dict(),
            "c": [t.clone() for t in self._c],
            "ci": [t.clone() for t in self._ci],
            "stats": dataclasses.asdict(self._stats),
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != dataclasses.asdict(self.config):
            raise ValueError("state: saved by an averager with another FedConfig")
        self.round = int(state["round"])
        self.state.load_state_dict(state["state"])
        if self.cstate is not None:
            self.cstate.load_state_dict(state["cstate"])
        self.outer.load_state_dict(state["outer"])
        for mine, saved in ((self._c, state["c"]), (self._ci, state["ci"])):
            for t, s in zip(mine, saved):
                t.copy_(s)
        self._stats = FedStats(**state["stats"])
