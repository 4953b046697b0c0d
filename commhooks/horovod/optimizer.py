"""commhooks' own Horovod ``DistributedOptimizer``: every compressor, per-name error feedback,
exchanges overlapped with backward."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

from commhooks._validate import check_choice
from commhooks.comm.collectives import Collectives
from commhooks.comm.hierarchical import TOPOLOGIES, NodeGroups, node_groups, node_ranks
from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.engine.state import CommStats, CompressionState, param_name
from commhooks.engine.step import Step
from commhooks.horovod.collectives import HorovodCollectives, horovod
from commhooks.horovod.compression import HorovodAdapter

__all__ = ["DistributedOptimizer", "broadcast_initial_state"]

logger = logging.getLogger(__name__)


class _Distributed(torch.optim.Optimizer):
    """Methods grafted onto a subclass of the user's optimizer class (as Horovod does), so the
    result is still an instance of that class for schedulers and checkpoints."""

    _ch: CompressionState

    def __init__(
        self,
        params: Any,
        named_parameters: list[tuple[str, Tensor]],
        compressor: Any,
        backward_passes_per_step: int,
        sum_instead: bool,
        process_set: Any,
        bucket_cap_mb: float,
        options: dict[str, Any],
    ) -> None:
        super(self.__class__, self).__init__(params)
        if options.get("fallback", "off") != "off":
            raise ValueError(
                f"fallback={options['fallback']!r}: the measured fall-back is a DDP hook option "
                "(it switches buckets to DDP's asynchronous all-reduce); this optimizer "
                "exchanges in step(). Leave it 'off'"
            )
        comm = HorovodCollectives(process_set)
        nodes = _node_sets(comm, process_set, options)
        if nodes is None:
            # Resolved here from Horovod's communicators, not from the environment.
            options = {**options, "topology": "flat"}
        self._ch = CompressionState(
            compressor,
            comm=comm,
            named_parameters=named_parameters,
            node_groups=(nodes.local, nodes.cross) if nodes is not None else None,
            **options,
        )
        self._ch_params = [p for _, p in named_parameters if p.requires_grad]
        self._buckets = _buckets(self._ch_params, bucket_cap_mb)
        self._bucket_of = {id(p): i for i, b in enumerate(self._buckets) for p in b}
        self.backward_passes_per_step = backward_passes_per_step
        self._sum = sum_instead
        self._passes: dict[int, int] = {}
        self._done_in: list[int] = [0] * len(self._buckets)  # parameters done, per bucket
        self._started: list[Future[list[Tensor]]] = []  # per bucket, in order
        self._step: Step | None = None
        self._synchronized = False
        self._should_synchronize = True
        # CPU and CUDA gradients' hooks run on different autograd threads.
        self._start_lock = threading.Lock()
        for p in self._ch_params:
            p.register_post_accumulate_grad_hook(self._count_pass)

    def _count_pass(self, p: Tensor) -> None:
        n = self._passes.get(id(p), 0) + 1
        if n > self.backward_passes_per_step:
            raise RuntimeError(
                f"backward ran {n} times before optimizer.step(), more than "
                f"backward_passes_per_step={self.backward_passes_per_step}; raise it to "
                "accumulate gradients locally"
            )
        self._passes[id(p)] = n
        if n == self.backward_passes_per_step:
            with self._start_lock:
                self._done_in[self._bucket_of[id(p)]] += 1
                # Buckets start strictly in order, so every rank's worker sees the same
                # sequence whatever order the gradients arrive in.
                while self._next_ready():
                    self._start(len(self._started))

    def _next_ready(self) -> bool:
        """Whether the next bucket to start has all of its gradients."""
        i = len(self._started)
        return i < len(self._buckets) and self._done_in[i] == len(self._buckets[i])

    def _start(self, i: int) -> None:
        """Hand bucket ``i``'s gradients to the communication worker."""
        params = self._buckets[i]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if i == 0:
            self._step = self._ch.begin()
        assert self._step is not None
        keys = [self._ch.key_of(p) for p in params]
        last = i == len(self._buckets) - 1
        self._started.append(self._step.submit(keys, [p.grad for p in params], last=last))

    def synchronize(self) -> None:
        """Wait for every parameter's gradient to be averaged over the process set, compressed,
        and write the averages into the gradients.

        The exchanges start during backward, bucket by bucket in a fixed order, as the
        gradients become final; what has not started by now (parameters without a gradient on
        this rank, which contribute zeros as in Horovod) starts here, in the same order.
        """
        with self._start_lock:
            for i in range(len(self._started), len(self._buckets)):
                self._start(i)
        step = self._step if self._step is not None else self._ch.begin()
        try:
            step.close()  # raises what a bucket's exchange raised, the step rolled back
            for params, fut in zip(self._buckets, self._started):
                for p, mean in zip(params, fut.value()):
                    p.grad.copy_(mean.mul_(self._ch.world_size) if self._sum else mean)
        finally:
            self._step = None
            self._started = []
            self._done_in = [0] * len(self._buckets)
            self._passes.clear()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside this block does not synchronize (call ``synchronize()`` first,
        e.g. to clip the averaged gradients)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(
                    "optimizer.step() called after optimizer.synchronize() outside "
                    "optimizer.skip_synchronize(): the gradients are averaged only once",
                    stacklevel=2,
                )
            else:
                self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._passes:
            raise RuntimeError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(); the gradients were not exchanged"
            )
        super(self.__class__, self).zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus, under ``"commhooks"``, this rank's compression
        state: its error-feedback memory, compressor state, step counter and stats."""
        state = super(self.__class__, self).state_dict()
        state["commhooks"] = self._ch.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("commhooks", None)
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is not None:
            self._ch.load_state_dict(ours)

    @property
    def compression_state(self) -> CompressionState:
        """The compression state (options, error feedback, transport)."""
        return self._ch

    def stats(self) -> CommStats:
        """Cumulative bytes and times, as :meth:`CompressionState.stats`."""
        return self._ch.stats()


def _names(
    optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]] | None
) -> list[tuple[str, Tensor]]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if named_parameters is None:
        return [(param_name(i), p) for i, p in enumerate(params)]
    named = list(named_parameters)
    if any(not isinstance(n, str) for n, _ in named):
        raise ValueError(
            "named_parameters: expected (str, Tensor) pairs, as model.named_parameters()"
        )
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"named_parameters: names must be unique; repeated: {dup}")
    ids = {id(p) for _, p in named}
    missing = [i for i, p in enumerate(params) if id(p) not in ids]
    if missing:
        raise ValueError(
            f"named_parameters: {len(missing)} of the optimizer's parameters are not named; "
            "pass model.named_parameters() of the model the optimizer trains"
        )
    # Keep the optimizer's order: it fixes the order of the collectives on every rank.
    name_of = {id(p): n for n, p in named}
    return [(name_of[id(p)], p) for p in params]


#: process sets this module added, by their ranks: Horovod refuses to add the same ranks twice,
#: and every rank adds them in the same order, so a second optimizer reuses them
_SETS: dict[tuple[int, ...], Any] = {}


def _node_sets(
    comm: HorovodCollectives, process_set: Any, options: dict[str, Any]
) -> NodeGroups | None:
    """The hierarchical topology's groups (:func:`~commhooks.comm.hierarchical.node_groups`)
    over Horovod: ranks per node from ``hvd.local_size()``, groups as process sets."""
    hvd = horovod()
    topology = options.get("topology", "auto")
    check_choice("topology", topology, TOPOLOGIES)
    if topology == "flat":
        return None
    if process_set is not None and process_set is not hvd.global_process_set:
        if topology == "auto":
            return None
        raise ValueError(
            f"topology={topology!r}: the hierarchical topology runs over every rank; with a "
            "process_set, use topology='flat'"
        )
    return node_groups(
        topology, comm, options.get("ranks_per_node", 0),
        launcher=(hvd.local_size(), hvd.local_rank(), "hvd.local_size()"),
        build=functools.partial(_process_sets, topology=topology),
    )  # fmt: skip


def _process_sets(comm: Collectives, per_node: int, topology: str) -> NodeGroups | None:
    """This rank's node (Horovod's local communicator) and its peers with the same local rank
    (the cross communicator) as process sets. Every rank adds every set, in the same order,
    as Horovod requires."""
    hvd = horovod()
    groups = node_ranks(comm.world, per_node)
    for ranks in groups:
        if tuple(ranks) not in _SETS:
            try:
                _SETS[tuple(ranks)] = hvd.add_process_set(ranks)
            except (ValueError, RuntimeError) as e:
                if topology == "auto":
                    # Alike on every rank (Horovod started without dynamic process sets):
                    # stay flat rather than break a job that asked for nothing.
                    logger.warning(
                        "commhooks: topology='auto' stays flat: Horovod could not add the "
                        "process set %s (%s); set HOROVOD_DYNAMIC_PROCESS_SETS=1 for the "
                        "hierarchical exchange",
                        ranks,
                        e,
                    )
                    return None
                raise RuntimeError(
                    f"topology={topology!r}: Horovod could not add the process set {ranks} "
                    f"({e}); set HOROVOD_DYNAMIC_PROCESS_SETS=1 before hvd.init(), or call "
                    "hvd.init(process_sets='dynamic')"
                ) from e
    local = _SETS[tuple(groups[comm.rank // per_node])]
    cross = _SETS[tuple(groups[comm.world // per_node + comm.rank % per_node])]
    return NodeGroups(HorovodCollectives(local), HorovodCollectives(cross))


def _buckets(params: list[Tensor], cap_mb: float) -> list[list[Tensor]]:
    """Parameters in reverse order (backward produces the last layers' gradients first), cut
    into buckets of one dtype and device of at most ``cap_mb`` megabytes (at least one
    parameter each)."""
    buckets: list[list[Tensor]] = []
    size, kind = 0, None
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if not buckets or (p.dtype, p.device) != kind or size + nbytes > cap_mb * 2**20:
            buckets.append([])
            size, kind = 0, (p.dtype, p.device)
        buckets[-1].append(p)
        size += nbytes
    return buckets


def _as_compressor(value: Any, hvd: Any) -> str | CompressorConfig | Compressor[Any]:
    """What Horovod users pass as ``compression``: our specs, configs and compressors, our
    :class:`~commhooks.horovod.Compression` adapters, and Horovod's own ``hvd.Compression``
    members, mapped to ours."""
    if isinstance(value, str | CompressorConfig | Compressor):
        return value
    if isinstance(value, HorovodAdapter):
        return value.compressor
    theirs = getattr(hvd, "Compression", None)
    if value is getattr(theirs, "none", object()):
        return "identity"
    if value is getattr(theirs, "fp16", object()):
        return "fp16"
    raise ValueError(
        f"compression={value!r}: expected a spec string such as 'topk:ratio=0.01', a "
        "compressor config or compressor, commhooks.horovod.Compression.*, or "
        "hvd.Compression.none / hvd.Compression.fp16"
    )


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    compressor: Any = "identity",
    backward_passes_per_step: int = 1,
    op: Any = None,
    process_set: Any = None,
    *,
    compression: Any = None,
    bucket_cap_mb: float = 25.0,
    **options: Any,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` first averages the gradients over Horovod ranks,
    compressed by ``compressor`` with per-parameter error feedback.

    A drop-in for ``hvd.DistributedOptimizer``: the result is an instance of the optimizer's
    class, with ``synchronize()``, ``skip_synchronize()`` and local accumulation over
    ``backward_passes_per_step`` backward passes. Unlike Horovod's it serves every commhooks
    compressor: all-reduce for summable payloads (casts, random-k, PowerSGD's two rounds,
    shared-scale integers), all-gather for per-worker ones (top-k, sign), and the compressed
    reduce-scatter with ``transport="reducescatter"``.

    Args:
        optimizer: the local optimizer; it is rebuilt from its ``param_groups`` (its state, if
            any, is not carried over, as in Horovod).
        named_parameters: ``model.named_parameters()``. Names key the error feedback and must
            match across ranks; without them parameters are named by position.
        compressor: a spec string (``"topk:ratio=0.01"``), config or compressor; also
            Horovod's ``hvd.Compression.none`` / ``.fp16`` and our ``Compression`` adapters.
        backward_passes_per_step: backward passes accumulated locally per ``step()``; more
            raise an error, as in Horovod.
        op: ``hvd.Average`` (default) or ``hvd.Sum``.
        process_set: a Horovod process set (default: all ranks).
        compression: Horovod's keyword for the same thing; give it or ``compressor``.
        bucket_cap_mb: gradients go to the exchange in buckets of about this size, each as
            soon as backward has produced all of its gradients (as DDP's ``bucket_cap_mb``).
            Smaller buckets start communication earlier; larger ones pay fewer collectives.
        **options: fields of :class:`commhooks.ddp.HookOptions` (``error_feedback``,
            ``start_iter``, ``transport``, ``min_numel``, ``log_every``, ...).

    Each bucket's exchange starts on a communication worker as soon as backward has produced
    its gradients (a copy of them is taken then, as Horovod's own optimizer reads them then),
    and ``step()``/``synchronize()`` waits for them. See docs/horovod.md.
    """
    hvd = horovod()
    if compression is not None:
        if not (isinstance(compressor, str) and compressor == "identity"):
            raise ValueError(
                f"compression={compression!r}: give either compression= (Horovod's keyword) "
                f"or compressor=, not both (compressor={compressor!r})"
            )
        compressor = compression
    compressor = _as_compressor(compressor, hvd)
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, int | float):
        raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r}: must be a number")
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb={bucket_cap_mb}: must be > 0")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer)}")
    if isinstance(optimizer, _Distributed):
        raise ValueError("optimizer: already a commhooks DistributedOptimizer")
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int):
        raise ValueError(f"backward_passes_per_step={backward_passes_per_step!r}: must be an int")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step={backward_passes_per_step}: must be >= 1")
    op = hvd.Average if op is None else op
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError(
            f"op={op!r}: only hvd.Average and hvd.Sum; Adasum and the others do not combine "
            "with compressed payloads"
        )
    named = _names(optimizer, named_parameters)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_Distributed.__dict__))
    return cls(  # type: ignore[no-any-return]
        optimizer.param_groups,
        named,
        compressor,
        backward_passes_per_step,
        op == hvd.Sum,
        process_set,
        float(bucket_cap_mb),
        options,
    )


def broadcast_initial_state(
    params: Any, optimizer: torch.optim.Optimizer, root_rank: int = 0
) -> None:
    """Start every rank from ``root_rank``'s parameters and optimizer state.

    ``params`` is ``model.state_dict()`` or ``model.named_parameters()``. Error-feedback
    memory is per worker and is not broadcast: at the start it is empty everywhere.
    """
    hvd = horovod()
    hvd.broadcast_parameters(params, root_rank=root_rank)
    # Horovod initialises an empty optimizer state with one step on zero gradients; skipping
    # the synchronization keeps that step out of the exchange (and out of the step counter).
    skip = getattr(optimizer, "skip_synchronize", contextlib.nullcontext)
    with skip():
        hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
