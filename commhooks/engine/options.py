"""The engine's options: how the hook treats each bucket (a frozen, validated config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from commhooks._validate import check_bool, check_choice, check_int, check_real
from commhooks.comm.hierarchical import TOPOLOGIES
from commhooks.comm.transport import TRANSPORTS
from commhooks.feedback import FeedbackConfig

__all__ = ["HookOptions"]


@dataclass(frozen=True)
class HookOptions:
    """How the hook treats each bucket.

    Tuned often:
        error_feedback: keep per-parameter residuals. ``"auto"`` (the default) turns it on for
            biased compressors (top-k, sign, PowerSGD, deterministic quantizers), which need it,
            and off for unbiased ones (QSGD, stochastic rounding, ternary), whose noise error
            feedback would carry over and, where it exceeds the signal (QSGD with the l2 norm),
            amplify. ``True``/``False`` force it.
        start_iter: dense all-reduce steps before compressing; early gradients change fast and
            compressing them hurts most (torch's PowerSGD uses 1000-10000 on large models).
        transport: ``"auto"`` (all-reduce when the payload is summable, else all-gather),
            ``"allreduce"``, ``"allgather"`` or ``"reducescatter"`` (flat traffic per rank as
            the world grows, for static-size compressors). Under ``topology="hierarchical"``
            this is the transport between nodes.
        topology: ``"flat"`` (every rank exchanges its whole compressed gradient with every
            other), ``"hierarchical"`` (a dense reduce-scatter inside each node, the
            compressed exchange of each rank's piece between nodes, a dense all-gather inside
            the node; see :mod:`commhooks.comm.hierarchical`), or ``"auto"`` (the default):
            hierarchical when the launcher reports more than one node and more than one rank
            per node. Pays where the link between nodes is much slower than inside one
            (NVLink or PCIe against Ethernet): the inter-node bytes per rank fall by the
            ranks per node. A checkpoint resumes only under the same topology.
        ranks_per_node: ranks per node for the hierarchical topology, numbered node by node;
            0 (the default) reads it from the launcher (``LOCAL_WORLD_SIZE`` under torchrun,
            ``OMPI_COMM_WORLD_LOCAL_SIZE`` under mpirun, Horovod's local size).

    Tuned seldom:
        min_numel: tensors with fewer elements go uncompressed, batched into one dense
            all-reduce per bucket: their headers and scales cost more than they save.
        compress_1d: compress 1-D tensors (biases, norm weights) too; off by default, since
            they are small and sensitive.
        min_ratio: tensors whose compression ratio is below this go dense with the small
            ones. The ratio is measured once per shape and dtype, on a seeded random probe, so
            every rank decides alike; compressors whose size depends on the data (threshold,
            DGC) always compress. 1.0 (the default) only drops compression where it would
            inflate a tensor (top-k near ratio 1 with its indices, PowerSGD at a rank near a
            small matrix's side); raise it (say to 4) where the codec time is not worth less.
            0 compresses every tensor past ``min_numel``.
        fallback: ``"off"`` (the default) or ``"auto"``: time each bucket's compressed path
            against a dense all-reduce for ``fallback_probes`` calls each, and send the bucket
            dense from then on where compression took longer (decided alike on every rank; see
            :mod:`commhooks.engine.fallback`). For links whose speed you do not know in advance;
            a dense bucket's error-feedback residual is sent with its first dense step.
        fallback_probes: timed calls per path before a bucket is settled (>= 1); the median
            is compared, so 3 tolerates one disturbed call.
        coalesce: exchange all of a step's buckets together, when DDP hands over the last
            one: one small all-reduce and one transport run per step instead of one per
            bucket, but no overlap with backward. Off (the default), each bucket is exchanged
            on the communication worker as soon as DDP hands it over, while backward goes
            on. Turn it on for high-latency links where a collective's start-up cost per
            bucket and round (PowerSGD: two) outweighs the overlap. Ignored with
            ``fallback="auto"``, which times and settles each bucket on its own.
        log_every: log a line of stats every this many steps (0: never): rank 0 at INFO, the
            others at DEBUG, with a stderr handler attached if logging is not configured
            (see :mod:`commhooks.metrics`).
        seed: seed of the rank-local randomness (stochastic rounding); the rank is mixed in.
        check_config: on the first compressed step, check that every rank uses the same
            compressor, options and transport, and raise instead of hanging if not.
        join_timeout_s: how long the first bucket waits for every rank of the group to have
            registered the hook (each rank announces itself through the process group's store
            when :func:`~commhooks.ddp.register` runs, and on its first bucket). A rank that
            runs plain DDP never does: the others then raise, naming it, instead of waiting
            out the process group's timeout. Raise it where ranks reach their first backward
            further apart than this after registering (a long evaluation on one rank first).
        nonfinite_check: how a step learns that some rank's gradients overflowed, over the
            all-reduce transport. ``"host"`` reads the all-reduced flag on the host: the
            exchange is abandoned and the bucket sent dense, error feedback untouched (no
            copies; cheapest on CPU, where a read costs nothing). ``"device"`` never reads
            device values during the step: the exchange completes, the averages of a bucket
            where some rank overflowed get a NaN (so GradScaler skips the step), and when the
            step closes every error-feedback change is undone by a device-side select
            (costs a copy of the residuals a step; for GPUs, where a host read stalls the
            stream). ``"auto"`` (the default): ``"device"`` for CUDA tensors, else ``"host"``.
            The all-gather transports need a host read for their sizes anyway and always
            check on the host.
        feedback: error-feedback options (decay, DGC momentum correction, warm-up).
    """

    error_feedback: bool | str = "auto"
    start_iter: int = 0
    transport: str = "auto"
    topology: str = "auto"
    ranks_per_node: int = 0
    min_numel: int = 1024
    compress_1d: bool = False
    min_ratio: float = 1.0
    fallback: str = "off"
    fallback_probes: int = 3
    coalesce: bool = False
    log_every: int = 0
    seed: int = 0
    check_config: bool = True
    join_timeout_s: float = 60.0
    nonfinite_check: str = "auto"
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)

    def __post_init__(self) -> None:
        if self.error_feedback != "auto":
            check_bool("error_feedback", self.error_feedback)
        check_int("start_iter", self.start_iter, lo=0)
        check_choice("transport", self.transport, ("auto", *sorted(TRANSPORTS)))
        check_choice("topology", self.topology, TOPOLOGIES)
        check_int("ranks_per_node", self.ranks_per_node, lo=0)
        check_int("min_numel", self.min_numel, lo=0)
        check_bool("compress_1d", self.compress_1d)
        check_real("min_ratio", self.min_ratio, lo=0.0)
        check_choice("fallback", self.fallback, ("off", "auto"))
        check_int("fallback_probes", self.fallback_probes, lo=1)
        check_bool("coalesce", self.coalesce)
        check_int("log_every", self.log_every, lo=0)
        check_int("seed", self.seed)
        check_bool("check_config", self.check_config)
        check_real("join_timeout_s", self.join_timeout_s, lo=0.0, lo_open=True)
        check_choice("nonfinite_check", self.nonfinite_check, ("auto", "host", "device"))
        if not isinstance(self.feedback, FeedbackConfig):
            raise ValueError(f"feedback={self.feedback!r}: must be a FeedbackConfig")
