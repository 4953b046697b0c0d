"""The engine's state: options, per-rank runtime state (error feedback, step counter), stats,
and the communication worker and collectives it runs on."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commhooks import metrics
from commhooks.comm.collectives import Collectives, TorchCollectives
from commhooks.comm.hierarchical import HierarchicalTransport, NodeGroups, node_groups
from commhooks.comm.placement import agree_topology
from commhooks.comm.transport import Transport, transport_class
from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.engine.average import average_flat
from commhooks.engine.fallback import BucketChoice, Fallback
from commhooks.engine.join import Join
from commhooks.engine.options import HookOptions
from commhooks.engine.step import Step
from commhooks.engine.worker import CommWorker
from commhooks.feedback import ErrorFeedback
from commhooks.kernels import dispatch as kernels
from commhooks.registry import compressor as build_compressor
from commhooks.stats import CommStats, StatsCallback

__all__ = ["CommStats", "CompressionState", "HookOptions", "param_name"]

#: The default names of parameters given without one. Checkpoints before it named Horovod's
#: ``param.<i>``; those are renamed on load (see ``CompressionState.load_state_dict``).
_DEFAULT_NAME = re.compile(r"param\d+")
_OLD_DEFAULT_NAME = re.compile(r"param\.(\d+)")


def param_name(index: int) -> str:
    """The name of the ``index``-th parameter where none is given (``"param<index>"``): every
    front end names unnamed parameters so. No dot, so it is never read as a module path."""
    return f"param{index}"


class CompressionState:
    """State of :func:`commhooks.ddp.compression_hook`: pass it to ``register_comm_hook``.

    Args:
        compressor: a spec string (``"topk:ratio=0.01"``), config or compressor.
        model: the model (or DDP module), used to key error feedback by parameter name. Without
            it, parameters are named by the order the hook first sees them, which is the same on
            every rank and every run of the same script.
        process_group: the group to communicate in (None: the default group).
        options: a :class:`HookOptions`; or give its fields as keyword arguments.
        comm: other collectives to run over instead of torch.distributed (the Horovod front
            end passes its own); ``process_group`` is then unused. Without them the state
            communicates over a process group of its own with ``process_group``'s ranks,
            created on first use, so its collectives never interleave with those DDP issues
            itself (buffer broadcasts, the unused-parameter bitmap).
        named_parameters: ``(name, parameter)`` pairs naming the parameters, when there is no
            model to take them from.
        node_groups: ``(local, cross)`` collectives or process groups for the hierarchical
            topology (the ranks of this node; this rank's peers on the other nodes), instead of
            groups built from the launcher's environment or ``ranks_per_node``.
    """

    def __init__(
        self,
        compressor: str | CompressorConfig | Compressor[Any],
        *,
        model: nn.Module | None = None,
        process_group: dist.ProcessGroup | None = None,
        options: HookOptions | None = None,
        comm: Collectives | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        node_groups: tuple[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if options is not None and kwargs:
            raise ValueError("options: pass a HookOptions or keyword options, not both")
        self.options = options if options is not None else HookOptions(**kwargs)
        self.process_group = process_group
        self._comm = comm
        self._join: Join | None = None
        self._node_groups = node_groups
        self._nodes: NodeGroups | bool | None = False  # False: not resolved yet
        self._transport: Transport | None = None
        self.compressor = build_compressor(compressor)
        ef = self.options.error_feedback
        #: whether error feedback is on (``"auto"`` resolved against the compressor)
        self.error_feedback = (not self.compressor.capabilities.unbiased) if ef == "auto" else ef
        self.feedback = (
            ErrorFeedback(self.compressor, self.options.feedback) if self.error_feedback else None
        )
        # Checked now; built over the process group on first use, since Lightning builds the
        # state before it initialises torch.distributed.
        self._transport_cls = transport_class(self.compressor, self.options.transport)
        if named_parameters is None and model is not None:
            named_parameters = model.named_parameters()
        self._names: dict[int, str] = {id(p): n for n, p in named_parameters or ()}
        self.iteration = 0
        self._stats = CommStats()
        self._checked = False
        self._mismatch: str | None = None
        self._seen: set[str] = set()
        self._pays: dict[tuple[tuple[int, ...], torch.dtype], bool] = {}
        self.fallback = (
            Fallback(self.options.fallback_probes) if self.options.fallback == "auto" else None
        )
        self._callbacks: list[StatsCallback] = []
        #: the open step (see :meth:`begin`), None between steps
        self.open_step: Step | None = None
        # Steps skipped by a device-side check, counted on the device (never read in a step).
        self._nonfinite_on_device: torch.Tensor | None = None
        #: runs the exchanges of the front ends that overlap them with backward
        self.worker = CommWorker()
        if self.compressor.uses_native_kernels:
            # Built (once per machine) now, not inside the first training step or a timed probe.
            kernels.prepare()

    # -- bound to the process group on first use ------------------------------------------

    @property
    def comm(self) -> Collectives:
        """The collectives: torch.distributed over a group of ``process_group``'s ranks,
        unless others were given. Every rank of the group must first call this at the same
        point (the hook does, on its first bucket)."""
        placement = None
        if self._comm is None:
            self.announce()
            assert self._join is not None
            self._join.wait(self.options.join_timeout_s)
            self._comm = TorchCollectives(_own_group(self.process_group))
            # Before any collective that depends on the topology, on every rank alike.
            opts = self.options
            placement = agree_topology(
                self._comm, opts.topology, opts.ranks_per_node, self._node_groups is not None
            )
        if self._nodes is False:
            self._nodes = node_groups(
                self.options.topology, self._comm, self.options.ranks_per_node, self._node_groups,
                placement,
            )  # fmt: skip
        return self._comm

    def announce(self) -> None:
        """Tell the group's other ranks, through the process group's store, that this rank
        runs the hook (see :mod:`commhooks.engine.join`); :func:`~commhooks.ddp.register`
        calls it, and so does the first bucket. Nothing to do with collectives of the caller's
        own (Horovod)."""
        if self._comm is not None and self._join is None:
            return
        if self._join is None:
            self._join = Join(_group_ranks(self.process_group))
        self._join.announce()

    @property
    def layout(self) -> str:
        """``"flat"`` or ``"hierarchical:<nodes>x<ranks per node>"`` (binds the state)."""
        self.comm  # noqa: B018 - resolves the node groups
        return self._nodes.layout if isinstance(self._nodes, NodeGroups) else "flat"

    def bind(self, bucket: torch.Tensor | None = None) -> Collectives:
        """Create the collectives now, on the calling thread: with torch.distributed that is
        a new process group, which every rank of it must create at the same point. With a
        ``bucket``, also run the cross-rank config check now (on the worker, waiting for it),
        so a mismatch raises here, before anything is queued. The DDP hook calls this on
        every bucket, before handing it to the worker."""
        comm = self.comm
        if bucket is not None and not self._checked:
            self.worker.run(lambda: self.check_agreement(bucket), bucket.device)
        return comm

    @property
    def world_size(self) -> int:
        return self.comm.world

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            # Rank-local randomness (stochastic rounding) differs per rank, so it averages out.
            self.compressor.set_seed(self.options.seed * 1_000_003 + self.rank)
            comm, nodes = self.comm, self._nodes
            if isinstance(nodes, NodeGroups):
                self._transport = HierarchicalTransport(
                    self.compressor, self.feedback, comm, local=nodes.local, cross=nodes.cross,
                    inner=self._transport_cls,
                )  # fmt: skip
            else:
                self._transport = self._transport_cls(self.compressor, self.feedback, comm)
        return self._transport

    # -- used by the hook -------------------------------------------------------------------

    def key_of(self, param: torch.Tensor) -> str:
        """A stable name for ``param``."""
        name = self._names.get(id(param))
        if name is None:
            name = param_name(len(self._names))
            self._names[id(param)] = name
        return name

    def pays(self, tensor: torch.Tensor) -> bool:
        """Whether compressing a tensor of this shape and dtype reaches ``min_ratio``.

        Measured on a seeded random probe with a fresh compressor of the same config, so the
        answer is the same on every rank and leaves this state's compressor untouched. Only
        for static-size compressors: the others' size depends on the data (a threshold keeps
        much more of a random probe than of a gradient), so they always compress.
        """
        if self.options.min_ratio <= 0 or not self.compressor.capabilities.static_size:
            return True
        shape = tuple(tensor.shape)
        hit = self._pays.get((shape, tensor.dtype))
        if hit is None:
            g = torch.Generator().manual_seed(0)
            probe = torch.randn(shape, generator=g).to(tensor.dtype)
            payload, _ = build_compressor(self.compressor.config).compress(probe, key="probe")
            sent = max(1, Compressor.nbytes(payload))
            hit = probe.numel() * probe.element_size() / sent >= self.options.min_ratio
            self._pays[(shape, tensor.dtype)] = hit
        return hit

    def fingerprint(self, extra: str = "") -> str:
        """What must agree across ranks: compressor, options (``check_config`` aside: ranks
        that disagree on it are caught too) and transport, plus ``extra``."""
        options = dataclasses.replace(self.options, check_config=True, join_timeout_s=60.0)
        text = f"{self.compressor.config.spec()}|{options!r}|{self._transport_cls.name}|{extra}"
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def check_agreement(self, bucket: torch.Tensor) -> None:
        """On the first exchange, compare every rank's fingerprint and first bucket's dtype
        (a half-precision wrapper on some ranks only changes it) in one small all-gather.
        Every rank takes part whatever its ``check_config``, so ranks that disagree on that
        too are caught; where any rank asked for the check and anything differs, every rank
        raises (instead of a hang later), and every later call raises again."""
        if self._mismatch is not None:
            raise RuntimeError(self._mismatch)
        if self._checked:
            return
        fp = int(self.fingerprint(f"{bucket.dtype}|{self.layout}"), 16) - (1 << 63)
        mine = torch.tensor([fp, int(self.options.check_config)], dtype=torch.int64)
        everyone = self.comm.all_gather(mine.to(bucket.device)).view(-1, 2).tolist()
        self._checked = True
        if len({fp for fp, _ in everyone}) > 1 and any(check for _, check in everyone):
            self._mismatch = (
                "commhooks: ranks disagree on the compressor, its options, the transport, the "
                f"topology or the bucket dtype (rank {self.rank} uses "
                f"{self.compressor.config.spec()!r} over {self._transport_cls.name!r}, "
                f"{self.layout}, on {bucket.dtype} buckets, check_config="
                f"{self.options.check_config}); every rank must build the same hook"
            )
            raise RuntimeError(self._mismatch)

    def memories(self) -> list[ErrorFeedback]:
        """Every error-feedback memory of this state: the workers' and the transport's own
        (the reduce-scatter transport's server side)."""
        server = getattr(self._transport, "server", None)
        return [m for m in (self.feedback, server) if m is not None]

    def checks_on_device(self, device: torch.device) -> bool:
        """Whether exchanges on ``device`` over this transport decide on overflow without
        reading device values (``nonfinite_check``)."""
        mode = self.options.nonfinite_check
        if mode == "auto":
            mode = "device" if device.type == "cuda" else "host"
        return mode == "device" and self.transport.device_checks

    # -- stats callbacks ------------------------------------------------------------------------

    def add_stats_callback(self, fn: StatsCallback) -> None:
        """Call ``fn(state, stats)`` after every step (``stats``: a copy); keep it cheap, it
        runs inside the step (DDP's last bucket). :mod:`commhooks.metrics` uses it."""
        if not callable(fn):
            raise ValueError(f"fn={fn!r}: must be callable")
        self._callbacks.append(fn)

    def remove_stats_callback(self, fn: StatsCallback) -> None:
        """Stop calling ``fn`` (ValueError if it was not added)."""
        if fn not in self._callbacks:
            raise ValueError(f"fn={fn!r}: not a callback of this state")
        self._callbacks.remove(fn)

    def step_closed(self) -> None:
        """After a step's stats are folded in: the ``log_every`` line, then the callbacks."""
        every, s = self.options.log_every, self._stats
        if every and s.steps % every == 0:
            metrics.log_step(s, self.rank)
        if self._callbacks:
            snapshot = self.stats()
            for fn in list(self._callbacks):
                fn(self, snapshot)

    # -- steps ---------------------------------------------------------------------------------

    def begin(self) -> Step:
        """Open a step (see :class:`~commhooks.engine.step.Step`); an unfinished earlier step
        (a backward that stopped before its last bucket, a failed exchange) is rolled back
        first."""
        if self.open_step is not None:
            self.open_step.abort()
        self.open_step = Step(self, average_flat)
        return self.open_step

    def current(self) -> Step:
        """The open step, or a new one."""
        return self.open_step if self.open_step is not None else self.begin()

    def _closed(self, step: Step) -> None:
        """Called by a step as it closes or aborts."""
        if self.open_step is step:
            self.open_step = None
        self._seen.clear()

    def count_nonfinite_on_device(self, skipped: torch.Tensor) -> None:
        """Add a closed step's device-side verdict (0-d bool: some rank overflowed) to the
        skipped steps, without reading it."""
        prev = self._nonfinite_on_device
        self._nonfinite_on_device = skipped.long() + (prev if prev is not None else 0)

    def begin_tensor(self, key: str) -> Step:
        """Per-tensor calls (compiled autograd's Python reducer) have no ``is_last()``: a key
        seen again means a new step began. Returns the step ``key`` belongs to."""
        if key in self._seen and self.open_step is not None:
            self.open_step.close()
        self._seen.add(key)
        return self.current()

    def abort_step(self) -> None:
        """Roll the open step back (see :meth:`Step.abort`); a no-op between steps."""
        if self.open_step is not None:
            self.open_step.abort()

    # -- public --------------------------------------------------------------------------------

    def stats(self) -> CommStats:
        """A copy of the cumulative stats (after the exchanges queued so far)."""
        self.worker.drain()
        out = dataclasses.replace(self._stats)
        if self._nonfinite_on_device is not None:
            out.nonfinite_steps += int(self._nonfinite_on_device)
        return out

    def fallback_report(self) -> list[BucketChoice]:
        """With ``fallback="auto"``: each bucket's probe times and the path chosen."""
        return self.fallback.report() if self.fallback is not None else []

    def state_dict(self) -> dict[str, Any]:
        """Error-feedback memory, compressor state (PowerSGD's Q, RNG), step counter, stats.

        The process group is not included.
        """
        self.worker.drain()
        rank, world = self._where()
        return {
            "iteration": self.iteration,
            "feedback": self.feedback.state_dict() if self.feedback is not None else None,
            "compressor": self.compressor.state_dict(),
            "transport": getattr(self.transport, "state_dict", dict)(),
            "stats": dataclasses.asdict(self.stats()),
            "fingerprint": self.fingerprint(),
            "topology": self.layout,
            "names": sorted(self._names.values()),
            "fallback": self.fallback.state_dict() if self.fallback is not None else None,
            "world_size": world,
            "rank": rank,
        }

    def _where(self) -> tuple[int | None, int | None]:
        """This state's rank and world size, without creating its process group."""
        if self._comm is not None:
            return self._comm.rank, self._comm.world
        if dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return None, None

    def _check_saved_layout(self, state: dict[str, Any]) -> dict[str, str]:
        """Refuse a checkpoint whose memory cannot line up with this state; return the renaming
        of saved parameter names to this state's (DDP's ``module.`` prefix added or removed)."""
        rank, world = self._where()
        saved_world, saved_rank = state.get("world_size"), state.get("rank")
        if saved_world is not None and world is not None and saved_world != world:
            if self._transport_cls.name == "reducescatter":
                raise ValueError(
                    f"state: saved by a {saved_world}-rank job, loading into {world} ranks; the "
                    "reduce-scatter transport's server memory is cut per rank and cannot be "
                    "re-split: resume with the same world size"
                )
            warnings.warn(
                f"commhooks: error-feedback memory saved by a {saved_world}-rank job loaded "
                f"into {world} ranks: each rank resumes from one saved rank's memory",
                stacklevel=3,
            )
        if saved_rank is not None and rank is not None and saved_rank != rank:
            warnings.warn(
                f"commhooks: rank {rank} loads the error-feedback memory rank {saved_rank} "
                "saved; each rank should load its own file",
                stacklevel=3,
            )
        saved = list(state.get("names") or [])
        mine = set(self._names.values())
        if not saved or set(saved) == mine:
            return {}
        if not mine and all(_DEFAULT_NAME.fullmatch(n) for n in saved):
            return {}  # both named by the order the hook meets the parameters
        if not mine:
            raise ValueError(
                f"state: its memory is keyed by parameter names ({saved[0]!r}, ...), but this "
                "state has none yet; build it with model= or named_parameters= so they match"
            )
        for renamed in (
            {n: n.removeprefix("module.") for n in saved},
            {n: "module." + n for n in saved},
            # Default names of the scheme before ``param_name``'s (Horovod's ``param.<i>``).
            {n: f"param{m[1]}" if (m := _OLD_DEFAULT_NAME.fullmatch(n)) else n for n in saved},
        ):
            if set(renamed.values()) == mine:
                return renamed
        missing = sorted(set(saved) - mine)[:5]
        raise ValueError(
            f"state: saved for other parameters; not in this model: {missing} (this model "
            f"has {sorted(mine)[:5]}, ...); load it into the model it was saved from"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.worker.drain()
        self.abort_step()
        saved_layout = state.get("topology", "flat")
        if saved_layout != self.layout:
            raise ValueError(
                f"state: saved under topology {saved_layout!r}, this job runs {self.layout!r}; "
                "error-feedback memory is kept per node piece and is not re-split: resume "
                "with the same nodes and ranks per node, or without the hook's state"
            )
        if state.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError("state: saved by a hook with another compressor, options or transport")
        renaming = self._check_saved_layout(state)
        if renaming:
            state = _renamed(state, renaming)
        transport = self.transport  # bind (and seed) first, so what is loaded is not reseeded
        self.iteration = int(state["iteration"])
        if self.feedback is not None and state.get("feedback") is not None:
            self.feedback.load_state_dict(state["feedback"])
        else:
            self.compressor.load_state_dict(state["compressor"])
        if hasattr(transport, "load_state_dict"):
            transport.load_state_dict(state.get("transport") or {})
        self._stats = CommStats(**state["stats"])
        if self.fallback is not None and state.get("fallback") is not None:
            self.fallback.load_state_dict(state["fallback"])
        self._nonfinite_on_device = None


def _group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` (None: every rank)."""
    if not dist.is_initialized():
        raise RuntimeError("process group: call torch.distributed.init_process_group first")
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _own_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A new process group with ``group``'s ranks (None: every rank), for the engine's
    collectives alone; only its own ranks take part in creating it."""
    return dist.new_group(_group_ranks(group), use_local_synchronization=True)


def _renamed(obj: Any, renaming: dict[str, str]) -> Any:
    """``obj`` with every dict key that is a parameter name in ``renaming`` (or such a name
    followed by ``/piece``, the reduce-scatter transport's keys) renamed."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str):
                head, sep, tail = k.partition("/")
                k = renaming.get(head, head) + sep + tail
            out[k] = _renamed(v, renaming)
        return out
    return obj
