"""End-to-end DDP benchmark over shaped links: step time, wire bytes and time to accuracy.

Usage (root: it builds network namespaces; ``make bench`` runs the default):
``.venv/bin/python benchmarks/e2e.py [--ranks 2 4] [--links 100mbit 1gbit none]
[--models mlp conv] [--variants dense topk ...] [--steps 3] [--reps 3] [--tta | --no-tta]
[--nodes 2x2] [--node-links 100mbit 1gbit] [--smoke] [--out bench-out]``

Each (ranks, link) pair gets a :class:`commhooks.launch.netns.ShapedCluster`: one network
namespace per rank, every interface shaped by tc to the link's rate (``none``: unshaped, but
still through the namespaces and veths, so all links take the same path), no added delay (this
kernel has no netem). Each namespace runs one single-process ``torchrun`` with a static
rendezvous at rank 0's address (as ``commhooks-launch shaped`` does): one gloo rank, one thread.

Variants: ``dense`` (DDP without a hook); torch's ``fp16_compress_hook`` (``torch-fp16``),
``bf16_compress_hook`` (``torch-bf16``) and ``powerSGD_hook`` (the rank of our PowerSGD,
``start_powerSGD_iter=2``). torch's PowerSGD with DDP's default buckets (``torch-powersgd``)
runs first, alone, in a launch with a short time limit (``psgd_probe_s``): its callbacks wait
on a second all-reduce inside gloo's threads and can hang (they did here), so a hang or crash
is its row; the main launch runs ``torch-powersgd-1bucket`` (the whole model in one bucket)
interleaved with the rest, and our PowerSGD is compared with that. Our hook
(:func:`commhooks.ddp.register`, default hook options) runs with every compressor of
:func:`commhooks.available` at its defaults, plus ``uniform:bits=8`` unless that
is ``uniform``'s default, and ``<spec>+fallback`` (our hook with ``fallback="auto"``) for a
few of them. ``dense`` is always run: the ratios need it. A hook that fails on every rank alike
is an error row, not a failed run. torch 2.13 refuses ``bf16_compress_hook`` by its name at
registration without CUDA and NCCL, though gloo reduces bf16 on the CPU, so it is registered
through a function of another name.

Models, on seeded synthetic batches of 32 per rank, plain SGD: ``mlp`` is ddp_step.py's MLP
1024-2048-2048-1024 (8.4M parameters, MSE); ``conv`` has three 3x3 conv + ReLU + max-pool
blocks (16, 32, 64 channels) and a 512-wide classifier on 3x32x32 inputs (0.55M parameters,
cross-entropy). No batch norm, so DDP sends nothing but gradients. DDP runs with
``gradient_as_bucket_view``: every variant stays alive for the interleaved reps, and this saves
a copy of the gradients for each.

Measured per (model, ranks, link):

* Step time, as in ddp_step.py: every variant is built once (two untimed steps; four for
  torch's PowerSGD, whose first two are dense), then ``--reps`` rounds in which every variant
  in turn runs ``--warmup`` untimed and ``--steps`` timed steps after a barrier; a rep's value
  is the slowest rank's time per step. A variant whose last build step took more than
  ``--slow-s`` runs one timed step per rep and no warm-up (the slow links would not fit
  otherwise). Reported: the median over reps, min / max, the median's ratio to ``dense`` and,
  for our PowerSGD, to torch's.
* Wire bytes. After the reps each variant runs one window of as many steps as a rep, and the
  parent reads every namespace's interface counters (``ShapedCluster.counters()``) at both ends:
  at each end rank 0 drops a marker file in a shared folder and waits for the parent's answer
  while the other ranks wait at a barrier. Reported per rank and step: bytes handed to
  collectives (our hook's ``CommStats``; for the baselines "analytic": 4 or 2 bytes per
  parameter, torch PowerSGD's P and Q and uncompressed tensors), the link bytes these imply
  for ring collectives (our hook's ``link_bytes``; ``2(n-1)/n`` of an all-reduce), the
  measured tx bytes (mean over the interfaces) and measured / implied. Headers, ACKs and the
  window's two barriers put it a little above 1 on large models and far above on tiny ones.
* Time to accuracy (``--tta``), per (ranks, link): dense, torch-fp16, torch-powersgd and our
  topk, sign, ternary, powersgd and uniform (those of them in ``--variants``) each train an MLP
  64-1024-1024-10 (1.1M parameters) on scikit-learn's digits, IID split among the ranks, batch
  32 per rank, SGD lr 0.05 momentum 0.9, from the same seed. Every 5 steps the clock stops and
  rank 0 measures test accuracy. Reported: training seconds (rank 0's clock; evaluation
  excluded, first steps included) and steps until test accuracy first reaches
  ``--tta-target`` (90%, which dense reaches in about 35 steps), the median over
  ``--tta-seeds`` seeds, and its ratio to dense's. A variant stops at the target, after 300
  steps or after 120 s of training. The variants run one after another, not interleaved.

Nodes x ranks per node (``--nodes 2x2``, on ``--node-links``; ``make bench`` runs 2x2 at
100 Mbit/s and 1 Gbit/s): one namespace per node, shaped as above, each running one torchrun
of 2 ranks, which reach each other over the namespace's loopback, unshaped (the "nodes x ranks
per node" mode of ``ShapedCluster``); so the interface counters count only what crosses
between nodes. On the 8.4M MLP alone, ``--node-variants``: ``dense``, ``compute-only`` (DDP
under ``no_sync()``: forward, backward and optimizer step, no communication, which tells
which rows are bound by the link), and for int8, 4-bit, top-k 1%, sign and PowerSGD both
``<spec>+flat`` (``topology="flat"``) and ``<spec>+hier`` (``topology="hierarchical"``). The
"Nodes" table sets them side by side: step time (min / median / max), tx bytes per node and
step measured on the interfaces, and the ratios, checked against the hierarchical targets
(inter-node bytes <= 0.55x flat; step time <= 0.7x flat where the flat step is link-bound,
else <= 1.05x).

The targets of the issue (step time at 100 Mbit/s against dense for sign, ternary, topk and
int8; our PowerSGD against torch's; every compressor unshaped; time to accuracy at 100 Mbit/s)
are checked in a "Targets" table and a "target" column. On this 2-core machine 4 ranks share
2 cores, so their compute takes about twice as long as on 2 ranks.

Written to ``--out``: ``e2e.json`` (everything), ``e2e.md`` (the tables, also printed),
``step_time.png`` (ratio to dense per variant and configuration) and ``tta.png`` (test
accuracy against training time). Progress goes to stderr. ``--smoke``: tiny models, 2 ranks,
100mbit, a few variants, a short time-to-accuracy run; for tests, well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.distributed as dist
from _report import accuracy_cells, by_label, parse_variant, write
from ddp_step import _max_over_ranks, _mean_over_ranks, mlp, n_params
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

import commhooks
import commhooks.ddp
from commhooks.ddp import CompressionState

DENSE = "dense"
TORCH_FP16 = "torch-fp16"
TORCH_BF16 = "torch-bf16"
TORCH_PSGD = "torch-powersgd"
TORCH_PSGD_1B = "torch-powersgd-1bucket"
COMPUTE = "compute-only"  # DDP under no_sync(): the step without communication
BASELINES = (DENSE, TORCH_FP16, TORCH_BF16, TORCH_PSGD, TORCH_PSGD_1B, COMPUTE)
INT8 = "uniform:bits=8"
NONE = "none"  # an unshaped link
#: torch's PowerSGD refuses less with error feedback: DDP's first two steps must be dense
TORCH_PSGD_START = 2
TTA_VARIANTS = (DENSE, TORCH_FP16, TORCH_PSGD, "topk", "sign", "ternary", "powersgd", "uniform")
SMOKE_VARIANTS = (DENSE, TORCH_FP16, TORCH_BF16, TORCH_PSGD, "topk", "sign", "powersgd", INT8)
MODELS = ("mlp", "conv")
#: how long rank 0 waits for the parent to read the counters; far above a poll (10 ms)
MARK_TIMEOUT_S = 60.0
#: once one rank has failed, how long the others get to notice before they are killed
FAIL_GRACE_S = 30.0


FLAT = "+flat"
HIER = "+hier"
#: the compressors the nodes runs compare, flat against hierarchical
NODE_SPECS = (INT8, "uniform:bits=4", "topk:ratio=0.01", "sign", "powersgd")
NODE_VARIANTS = (DENSE, COMPUTE, *(s + t for s in NODE_SPECS for t in (FLAT, HIER)))
#: (spec, link) where the flat step is expected to be bound by the inter-node link
LINK_BOUND = {
    *((spec, link) for spec in (INT8, "uniform:bits=4") for link in ("100mbit", "1gbit")),
    ("topk:ratio=0.01", "100mbit"),
    ("sign", "100mbit"),
}


@dataclass(frozen=True)
class Config:
    """What to run: the grid, the models' sizes, step counts and the time-to-accuracy runs."""

    ranks: tuple[int, ...] = (2, 4)
    links: tuple[str, ...] = ("100mbit", "1gbit", NONE)
    models: tuple[str, ...] = MODELS
    variants: tuple[str, ...] = ()
    mlp_widths: tuple[int, ...] = (1024, 2048, 2048, 1024)
    conv_channels: tuple[int, ...] = (16, 32, 64)
    conv_hidden: int = 512
    conv_side: int = 32
    batch: int = 32
    lr: float = 0.01
    steps: int = 3
    warmup: int = 1
    build_steps: int = 2
    reps: int = 3
    slow_s: float = 0.5
    tta: bool = True
    tta_variants: tuple[str, ...] = TTA_VARIANTS
    tta_hidden: int = 1024
    tta_target: float = 90.0
    tta_lr: float = 0.05
    tta_eval_every: int = 5
    tta_max_steps: int = 300
    tta_max_s: float = 120.0
    tta_seeds: int = 1
    seed: int = 0
    timeout_s: float = 1800.0  # one (ranks, link) launch, everything included
    pg_timeout_s: float = 300.0  # one collective
    psgd_probe_s: float = 90.0  # torch's PowerSGD with default buckets, in a launch of its own
    nodes: tuple[str, ...] = ("2x2",)  # "<nodes>x<ranks per node>" runs
    node_links: tuple[str, ...] = ("100mbit", "1gbit")
    node_variants: tuple[str, ...] = NODE_VARIANTS

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Config:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SMOKE = Config(
    ranks=(2,),
    links=("100mbit",),
    variants=SMOKE_VARIANTS,
    mlp_widths=(64, 128, 64),
    conv_channels=(4, 8),
    conv_hidden=16,
    conv_side=8,
    steps=2,
    warmup=0,
    build_steps=1,
    reps=2,
    tta_variants=(DENSE, "topk", "sign"),
    tta_hidden=64,
    tta_target=70.0,
    tta_max_steps=100,
    tta_max_s=20.0,
    nodes=(),
    timeout_s=150.0,
    pg_timeout_s=60.0,
    psgd_probe_s=60.0,
)


@dataclass
class Row:
    """One variant on one (model, ranks, link): step times, and bytes from the window."""

    model: str
    ranks: int
    link: str
    label: str
    error_feedback: bool | None = None
    error: str | None = None
    steps: int = 0
    slow: bool = False
    build_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    window: list[int] = field(default_factory=list)  # the marker numbers at its two ends
    wire_bytes: float | None = None  # per rank and step, handed to collectives
    wire_source: str = ""  # "hook" or "analytic"
    link_est_bytes: float | None = None  # per rank and step, implied for ring collectives
    iface_tx_bytes: float | None = None  # per rank and step, measured on the interfaces
    iface_rx_bytes: float | None = None
    iface_vs_est: float | None = None
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    vs_dense: float | None = None
    vs_torch_powersgd: float | None = None
    fallback: str | None = None  # fallback="auto": "<dense buckets>/<buckets> dense"
    per_node: int = 1  # ranks per namespace (node); the interface bytes are then per node


@dataclass
class TTARow:
    """One variant's digits run for one seed: accuracy against training seconds."""

    ranks: int
    link: str
    label: str
    seed: int
    target: float
    error: str | None = None
    time_s: float | None = None  # training seconds until the target; None: not reached
    steps_to_target: int | None = None
    steps: int = 0
    train_s: float = 0.0
    accuracy: float = 0.0  # the last one measured
    curve_steps: list[int] = field(default_factory=list)
    curve_s: list[float] = field(default_factory=list)
    curve_acc: list[float] = field(default_factory=list)


@dataclass
class Target:
    """One of the issue's targets at one place, and whether this run met it."""

    what: str
    where: str
    limit: float
    value: float | None
    met: bool | None


# -- models ------------------------------------------------------------------------------------


def convnet(channels: Sequence[int], hidden: int, side: int, classes: int = 10) -> nn.Sequential:
    """3x3 conv + ReLU + 2x2 max-pool blocks on 3-channel ``side`` x ``side`` inputs, then a
    ``hidden``-wide two-layer classifier."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    flat = c_in * (side >> len(channels)) ** 2
    layers += [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


def build_model(name: str, cfg: Config) -> nn.Module:
    if name == "mlp":
        return mlp(cfg.mlp_widths)
    return convnet(cfg.conv_channels, cfg.conv_hidden, cfg.conv_side)


def count_params(name: str, cfg: Config) -> int:
    return (
        n_params(cfg.mlp_widths)
        if name == "mlp"
        else sum(p.numel() for p in build_model(name, cfg).parameters())
    )


def describe(name: str, cfg: Config) -> str:
    n = count_params(name, cfg)
    if name == "mlp":
        return f"MLP {'-'.join(map(str, cfg.mlp_widths))} ({n:,} parameters, MSE)"
    chans = "-".join(map(str, cfg.conv_channels))
    return (
        f"conv net {chans} channels + {cfg.conv_hidden} hidden on 3x{cfg.conv_side}x"
        f"{cfg.conv_side} ({n:,} parameters, cross-entropy)"
    )


Loss = Callable[[Tensor, Tensor], Tensor]


def make_batches(name: str, cfg: Config, rank: int) -> tuple[list[tuple[Tensor, Tensor]], Loss]:
    """Four seeded batches (different on every rank) and the loss that goes with them."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    if name == "mlp":
        w = cfg.mlp_widths
        data = [
            (torch.randn(cfg.batch, w[0], generator=g), torch.randn(cfg.batch, w[-1], generator=g))
            for _ in range(4)
        ]
        return data, nn.functional.mse_loss
    s = cfg.conv_side
    data = [
        (torch.randn(cfg.batch, 3, s, s, generator=g), torch.randint(10, (cfg.batch,), generator=g))
        for _ in range(4)
    ]
    return data, nn.functional.cross_entropy


FALLBACK = "+fallback"
# Our hook with HookOptions(fallback="auto") too: the unshaped target's remedy, and on shaped
# links the check that it keeps compressing where that pays.
FALLBACK_SPECS = ("topk", "sign", "ternary", "qsgd", "powersgd", INT8)


# int8 with the reduce-scatter transport (not its default): traffic per rank that stays flat
# as ranks are added, where the default all-gather's grows.
RS = "+rs"
SUFFIXES = {
    FALLBACK: {"fallback": "auto"},
    RS: {"transport": "reducescatter"},
    FLAT: {"topology": "flat"},
    HIER: {"topology": "hierarchical"},
}


def our_spec(label: str) -> tuple[str, dict[str, Any]]:
    """Our variant's compressor spec and hook options: ``"<spec>+fallback"`` adds
    ``fallback="auto"``, ``"<spec>+rs"`` ``transport="reducescatter"``, ``"<spec>+flat"`` and
    ``"<spec>+hier"`` ``topology="flat"`` or ``"hierarchical"``, and
    ``"<spec>@option=value,..."`` any hook options (e.g. ``sign@coalesce=True``)."""
    spec, options = parse_variant(label)
    for suffix, extra in SUFFIXES.items():
        if spec.endswith(suffix):
            return spec[: -len(suffix)], {**extra, **options}
    return spec, options


def one_bucket_mb(module: nn.Module) -> float:
    """A ``bucket_cap_mb`` that puts every gradient in one DDP bucket."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20 + 1.0


def our_powersgd_rank(labels: Sequence[str]) -> int:
    """The rank of the first of our PowerSGD variants (its default if there is none)."""
    for label in [*labels, "powersgd"]:
        if label not in BASELINES:
            config = commhooks.parse_spec(our_spec(label)[0])
            if config.name == "powersgd":
                return int(config.rank)  # type: ignore[attr-defined]
    raise AssertionError("unreachable: 'powersgd' is a registered compressor")


def torch_powersgd_bytes(module: nn.Module, rank: int) -> float:
    """Bytes torch's PowerSGD hands to all-reduce per step once compressing: per tensor,
    viewed as ``shape[0] x rest``, P and Q where ``(n + m) r * 2 < n m`` (its default
    ``min_compression_rate``), else the tensor itself."""
    total = 0
    for p in module.parameters():
        n = p.shape[0]
        m = p.numel() // n
        r = min(n, m, rank)
        total += (n + m) * r if (n + m) * r * 2 < n * m else p.numel()
    return 4.0 * total


class Variant:
    """A DDP model with its hook (or none), optimizer, and our hook's state if any."""

    def __init__(
        self, label: str, module: nn.Module, lr: float, psgd_rank: int, momentum: float = 0.0
    ) -> None:
        self.label = label
        kwargs: dict[str, Any] = {"gradient_as_bucket_view": True}
        if label == TORCH_PSGD_1B:
            kwargs["bucket_cap_mb"] = one_bucket_mb(module)
        self.model = nn.parallel.DistributedDataParallel(module, **kwargs)
        self.state: CompressionState | None = None
        self.dense_steps = 0  # torch's PowerSGD: dense steps before it compresses
        if label == TORCH_FP16:
            self.model.register_comm_hook(dist.group.WORLD, default_hooks.fp16_compress_hook)
        elif label == TORCH_BF16:
            # DDP refuses this hook by its name unless CUDA and NCCL are present, though gloo
            # reduces bf16 on the CPU: register the same function under another name. (No
            # annotations: under postponed evaluation DDP would read the string "GradBucket".)
            def torch_bf16(state, bucket):  # type: ignore[no-untyped-def]
                return default_hooks.bf16_compress_hook(state, bucket)

            self.model.register_comm_hook(dist.group.WORLD, torch_bf16)
        elif label in (TORCH_PSGD, TORCH_PSGD_1B):
            psgd = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=psgd_rank,
                start_powerSGD_iter=TORCH_PSGD_START,
            )
            self.model.register_comm_hook(psgd, powerSGD_hook.powerSGD_hook)
            self.dense_steps = TORCH_PSGD_START
        elif label not in (DENSE, COMPUTE):
            spec, options = our_spec(label)
            self.state = commhooks.ddp.register(self.model, spec, **options)
            if "fallback" in options:
                # Probe calls of every bucket, after DDP's rebuild of its buckets at step 1,
                # fall in the build steps; the timed steps see the settled paths.
                self.dense_steps = 2 * self.state.options.fallback_probes + 2
        # torch's PowerSGD keeps error feedback (use_error_feedback=True); the casts have none.
        self.error_feedback: bool | None = None
        if self.state is not None:
            self.error_feedback = self.state.error_feedback
        elif label in (TORCH_PSGD, TORCH_PSGD_1B):
            self.error_feedback = True
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)

    def step(self, x: Tensor, y: Tensor, loss: Loss) -> None:
        self.opt.zero_grad()
        with self.model.no_sync() if self.label == COMPUTE else contextlib.nullcontext():
            loss(self.model(x), y).backward()
        self.opt.step()

    def counted(self) -> tuple[float, float]:
        """Our hook's cumulative (wire, link) bytes on this rank."""
        assert self.state is not None
        s = self.state.stats()
        return float(s.wire_bytes), float(s.link_bytes)

    def analytic_bytes(self, psgd_rank: int) -> float:
        """A baseline's bytes handed to all-reduce per step, from the parameters."""
        module = self.model.module
        if self.label in (TORCH_PSGD, TORCH_PSGD_1B):
            return torch_powersgd_bytes(module, psgd_rank)
        if self.label == COMPUTE:
            return 0.0
        per = 4.0 if self.label == DENSE else 2.0
        return per * sum(p.numel() for p in module.parameters())


# -- the worker: one per namespace, under torchrun -----------------------------------------------


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    # torchrun starts its worker in a session of its own, so stopping the agent's process
    # group would leave the worker behind: have the kernel kill it when the agent dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Marks:
    """Window ends: rank 0 asks the parent (through files in a shared folder) to read the
    interface counters; every rank waits until it has."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seq = 0

    def mark(self) -> int:
        seq, self.seq = self.seq, self.seq + 1
        dist.barrier()
        if dist.get_rank() == 0:
            req = os.path.join(self.folder, f"m{seq}.req")
            with open(req + ".tmp", "w") as f:
                f.write(str(seq))
            os.replace(req + ".tmp", req)  # the parent never sees a half-written file
            ack = os.path.join(self.folder, f"m{seq}.ack")
            end = time.monotonic() + MARK_TIMEOUT_S
            while not os.path.exists(ack):
                if time.monotonic() > end:
                    raise TimeoutError(f"marker {seq}: no answer from the parent")
                time.sleep(0.002)
        dist.barrier()
        return seq


def _timed_steps(
    v: Variant, batches: list[tuple[Tensor, Tensor]], loss: Loss, n: int, start: int = 0
) -> float:
    """Seconds per step of ``n`` steps on the slowest rank, after a barrier."""
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(n):
        v.step(*batches[(start + i) % len(batches)], loss)
    return _max_over_ranks(time.perf_counter() - t0) / n


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def _build(
    label: str,
    name: str,
    cfg: Config,
    psgd_rank: int,
    batches: list[tuple[Tensor, Tensor]],
    loss: Loss,
    row: Row,
) -> Variant:
    """A variant after its build steps, their times recorded in ``row``."""
    torch.manual_seed(cfg.seed)  # every variant starts from the same weights
    v = Variant(label, build_model(name, cfg), cfg.lr, psgd_rank)
    row.error_feedback = v.error_feedback
    for i in range(max(cfg.build_steps, 1) + v.dense_steps):
        row.build_s.append(_timed_steps(v, batches, loss, 1, start=i))
    return v


def measure_model(name: str, cfg: Config, link: str, marks: Marks) -> list[dict[str, Any]]:
    """Build every variant, run the interleaved reps, then each variant's bytes window."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches, loss = make_batches(name, cfg, rank)
    psgd_rank = our_powersgd_rank(cfg.variants)
    rows: list[Row] = []
    live: list[tuple[Variant, Row]] = []
    pending = list(cfg.variants)
    while pending:
        label = pending.pop(0)
        t0 = time.perf_counter()
        row = Row(name, world, link, label, per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        rows.append(row)
        try:
            v = _build(label, name, cfg, psgd_rank, batches, loss, row)
        except Exception as e:
            # Raised alike on every rank (a hook refused at registration, or one that cannot
            # handle these buckets), so the ranks stay in step; a one-sided failure ends in
            # the process group's timeout.
            row.error = _error(e)
            _log(f"{name}: {label} failed: {row.error}")
            gc.collect()  # the failed model, while the process group lives
            dist.barrier()
            if label == TORCH_PSGD and TORCH_PSGD_1B not in cfg.variants:
                pending.insert(0, TORCH_PSGD_1B)
            continue
        row.slow = row.build_s[-1] > cfg.slow_s  # a max over ranks: the same on every rank
        row.steps = 1 if row.slow else cfg.steps
        live.append((v, row))
        _log(
            f"{name}: built {label}: last build step {row.build_s[-1]:.3f} s "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    per_rep = sum(r.build_s[-1] * (r.steps + (0 if r.slow else cfg.warmup)) for _, r in live)
    _log(f"{name}: {cfg.reps} reps of about {per_rep:.0f} s")
    for rep in range(cfg.reps):
        t0 = time.perf_counter()
        for v, row in live:
            if cfg.warmup and not row.slow:
                _timed_steps(v, batches, loss, cfg.warmup)
            row.step_s.append(_timed_steps(v, batches, loss, row.steps))
        _log(f"{name}: rep {rep + 1}/{cfg.reps}: {time.perf_counter() - t0:.1f} s")
    for v, row in live:
        before = v.counted() if v.state is not None else (0.0, 0.0)
        row.window = [marks.mark()]
        for i in range(row.steps):
            v.step(*batches[i % len(batches)], loss)
        row.window.append(marks.mark())
        if v.state is not None:
            after = v.counted()
            wire, link_b = _mean_over_ranks([after[0] - before[0], after[1] - before[1]])
            row.wire_bytes, row.link_est_bytes = wire / row.steps, link_b / row.steps
            row.wire_source = "hook"
            settled = [b for b in v.state.fallback_report() if b.choice is not None]
            if v.state.fallback is not None:
                dense = sum(b.choice == "dense" for b in settled)
                row.fallback = f"{dense}/{len(settled)} dense"
        else:
            row.wire_bytes = v.analytic_bytes(psgd_rank)
            row.link_est_bytes = 2 * (world - 1) / world * row.wire_bytes
            row.wire_source = "analytic"
    _log(f"{name}: bytes windows done")
    return [asdict(r) for r in rows]


def _accuracy(module: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean()) * 100


def _train_to_target(
    label: str,
    cfg: Config,
    psgd_rank: int,
    digits: tuple[Tensor, ...],
    shard: Tensor,
    row: TTARow,
) -> None:
    """Train one variant on digits until the target, the step cap or the time cap."""
    rank = dist.get_rank()
    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(row.seed)
    h = cfg.tta_hidden
    v = Variant(label, mlp((64, h, h, 10)), cfg.tta_lr, psgd_rank, momentum=0.9)
    g = torch.Generator().manual_seed(row.seed * 1000 + rank)
    dist.barrier()
    while row.steps < cfg.tta_max_steps:
        t0 = time.perf_counter()
        for _ in range(cfg.tta_eval_every):
            idx = shard[torch.randint(len(shard), (cfg.batch,), generator=g)]
            v.step(x_tr[idx], y_tr[idx], nn.functional.cross_entropy)
        train_s = row.train_s + time.perf_counter() - t0
        row.steps += cfg.tta_eval_every
        # Rank 0's accuracy and clock decide for everyone, so that all stop together.
        acc = _accuracy(v.model.module, x_te, y_te) if rank == 0 else 0.0
        both = torch.tensor([acc, train_s], dtype=torch.float64)
        dist.broadcast(both, 0)
        row.accuracy, row.train_s = both.tolist()
        row.curve_steps.append(row.steps)
        row.curve_s.append(row.train_s)
        row.curve_acc.append(row.accuracy)
        if row.accuracy >= cfg.tta_target:
            row.time_s, row.steps_to_target = row.train_s, row.steps
            return
        if row.train_s > cfg.tta_max_s:
            return


def time_to_accuracy(cfg: Config, link: str) -> list[dict[str, Any]]:
    """Every time-to-accuracy variant, for every seed, one after another."""
    from commhooks.data import iid_split, load_digits

    world = dist.get_world_size()
    digits = load_digits(seed=cfg.seed)
    psgd_rank = our_powersgd_rank(cfg.variants)
    out: list[TTARow] = []
    for seed in range(cfg.seed, cfg.seed + cfg.tta_seeds):
        shard = iid_split(len(digits[1]), world, seed=seed)[dist.get_rank()]
        for label in cfg.tta_variants:
            row = TTARow(world, link, label, seed, cfg.tta_target)
            out.append(row)
            try:
                _train_to_target(label, cfg, psgd_rank, digits, shard, row)
            except Exception as e:  # alike on every rank, as in measure_model
                row.error = _error(e)
            reached = "not reached" if row.time_s is None else f"{row.time_s:.2f} s"
            _log(
                f"tta {label} (seed {seed}): {cfg.tta_target:g}% {reached}, {row.steps} steps, "
                f"last {row.accuracy:.1f}%" + (f" ({row.error})" if row.error else "")
            )
            gc.collect()  # the variant's DDP model, while the process group lives
            dist.barrier()
    return [asdict(r) for r in out]


def worker(job_path: str) -> None:
    """One rank: every model's step times and bytes, then time to accuracy; rank 0 saves."""
    _die_with_parent()
    with open(job_path) as f:
        job = json.load(f)
    cfg = Config.from_json(job["config"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.pg_timeout_s))
    try:
        marks = Marks(job["folder"])
        rows: list[dict[str, Any]] = []
        for name in cfg.models:
            rows += measure_model(name, cfg, job["link"], marks)
            # DDP models sit in reference cycles (model -> hook -> state): free them while
            # the process group lives; freed after it, gloo can abort the process.
            gc.collect()
            dist.barrier()
        tta = time_to_accuracy(cfg, job["link"]) if cfg.tta else []
        if dist.get_rank() == 0:
            with open(job["result"] + ".tmp", "w") as f:
                json.dump({"rows": rows, "tta": tta}, f)
            os.replace(job["result"] + ".tmp", job["result"])
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


# -- the parent: one shaped cluster per (ranks, link) --------------------------------------------


def _start(cluster: Any, cmds: list[list[str]]) -> list[subprocess.Popen[bytes]]:
    """Start ``cmds[i]`` in namespace ``i``, as ``ShapedCluster.run`` does, without waiting:
    the parent must answer the markers meanwhile."""
    procs = []
    for i, cmd in enumerate(cmds):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.update(GLOO_SOCKET_IFNAME=cluster.iface(i), MASTER_ADDR=cluster.addr(0))
        procs.append(
            subprocess.Popen([*cluster.exec_prefix(i), *cmd], env=env, start_new_session=True)
        )
    return procs


def _serve(
    cluster: Any, procs: list[subprocess.Popen[bytes]], folder: str, timeout_s: float
) -> tuple[list[int], dict[int, list[tuple[int, int]]]]:
    """Answer rank 0's markers with interface counters until every rank has exited."""
    counters: dict[int, list[tuple[int, int]]] = {}
    end = time.monotonic() + timeout_s
    seq = 0
    while True:
        req = os.path.join(folder, f"m{seq}.req")
        if os.path.exists(req):
            counters[seq] = cluster.counters()
            with open(os.path.join(folder, f"m{seq}.ack"), "w") as f:
                f.write(str(seq))
            seq += 1
            continue
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes if c is not None], counters
        if any(c for c in codes):
            end = min(end, time.monotonic() + FAIL_GRACE_S)
        if time.monotonic() > end:
            raise TimeoutError(f"ranks still running after the time limit (exit codes {codes})")
        time.sleep(0.01)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (torchrun then stops its worker), then SIGKILL what is left."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + 10.0
    for p in alive:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def run_job(
    cfg: Config, ranks: int, link: str, tmp: str, timeout_s: float, per_node: int = 1
) -> dict[str, Any]:
    """One launch: ``cfg``'s models and time-to-accuracy runs on a fresh shaped cluster of
    ``ranks // per_node`` namespaces (nodes) of ``per_node`` ranks each."""
    from commhooks.launch.cli import shaped_commands
    from commhooks.launch.commands import quote
    from commhooks.launch.netns import Link, ShapedCluster

    folder = tempfile.mkdtemp(prefix=f"r{ranks}-{link}-", dir=tmp)
    job = {
        "config": asdict(cfg),
        "link": link,
        "folder": folder,
        "result": os.path.join(folder, "result.json"),
    }
    job_path = os.path.join(folder, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    nodes = ranks // per_node
    cluster = ShapedCluster(nodes, Link(None if link == NONE else link), ranks_per_node=per_node)
    script = [os.path.abspath(__file__), "--worker", job_path]
    cmds = shaped_commands(cluster, script, random.randint(20000, 59999))
    for i, c in enumerate(cmds):
        print("  " + quote([*cluster.exec_prefix(i), *c]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with cluster:
        procs = _start(cluster, cmds)
        try:
            codes, counters = _serve(cluster, procs, folder, timeout_s)
        finally:
            _stop(procs)
    wall = time.perf_counter() - t0
    if any(codes) or not os.path.exists(job["result"]):
        raise RuntimeError(f"ranks exited with {codes}")
    with open(job["result"]) as f:
        result = json.load(f)
    rows = [Row(**r) for r in result["rows"]]
    for r in rows:
        if len(r.window) == 2 and r.steps:
            a, b = (counters[s] for s in r.window)
            r.iface_tx_bytes = sum(b[i][0] - a[i][0] for i in range(nodes)) / nodes / r.steps
            r.iface_rx_bytes = sum(b[i][1] - a[i][1] for i in range(nodes)) / nodes / r.steps
            if r.link_est_bytes:
                r.iface_vs_est = r.iface_tx_bytes / r.link_est_bytes
    return {"rows": rows, "tta": [TTARow(**t) for t in result["tta"]], "wall_s": wall}


def run_nodes(cfg: Config, spec: str, link: str, tmp: str) -> dict[str, Any]:
    """The node variants on ``spec`` (``"<nodes>x<ranks per node>"``) nodes joined by ``link``:
    the 8.4M MLP, no time to accuracy."""
    nodes, per_node = (int(v) for v in spec.split("x"))
    job = replace(cfg, models=("mlp",), variants=cfg.node_variants, tta=False)
    where = f"[{spec} nodes, {link}]"
    print(where, file=sys.stderr, flush=True)
    res = run_job(job, nodes * per_node, link, tmp, cfg.timeout_s, per_node=per_node)
    print(f"{where} done in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return res


def probe_torch_powersgd(cfg: Config, ranks: int, link: str, tmp: str) -> list[Row]:
    """torch's PowerSGD with DDP's default buckets, alone in a launch with a short time limit.

    Its hook waits for a second all-reduce inside a callback, on gloo's own threads; with
    several buckets in flight those threads can all end up waiting (seen here: a hang in the
    first timed rep, after the build steps went through). A hang or crash is its result, and
    the main launch measures the one-bucket rerun instead, so that it cannot hang.
    """
    probe = replace(cfg, variants=(TORCH_PSGD,), tta=False, reps=2)
    print(f"[{ranks} ranks, {link}] torch PowerSGD, default buckets", file=sys.stderr, flush=True)
    try:
        return run_job(probe, ranks, link, tmp, cfg.psgd_probe_s)["rows"]
    except TimeoutError:
        why = (
            f"hung: no progress in {cfg.psgd_probe_s:.0f} s with DDP's default buckets "
            "(callbacks wait on a second all-reduce in gloo's threads)"
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        why = f"crashed with DDP's default buckets: {_error(e)}"
    print(f"[{ranks} ranks, {link}] torch PowerSGD {why}", file=sys.stderr, flush=True)
    return [Row(m, ranks, link, TORCH_PSGD, error=why) for m in cfg.models]


def run_pair(cfg: Config, ranks: int, link: str, tmp: str) -> dict[str, Any]:
    """Every model and the time-to-accuracy variants on one (ranks, link): torch's PowerSGD
    with default buckets probed in a launch of its own, the rest in one."""
    probed: list[Row] = []
    variants = list(cfg.variants)
    if TORCH_PSGD in variants:
        probed = probe_torch_powersgd(cfg, ranks, link, tmp)
        at = variants.index(TORCH_PSGD)
        variants[at : at + 1] = [] if TORCH_PSGD_1B in variants else [TORCH_PSGD_1B]
    # time to accuracy too: a hang there would cost the whole launch's time limit
    tta = tuple(dict.fromkeys(TORCH_PSGD_1B if v == TORCH_PSGD else v for v in cfg.tta_variants))
    main = replace(cfg, variants=tuple(variants), tta_variants=tta)
    print(f"[{ranks} ranks, {link}]", file=sys.stderr, flush=True)
    res = run_job(main, ranks, link, tmp, cfg.timeout_s)
    print(f"[{ranks} ranks, {link}] done in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    res["rows"] = probed + res["rows"]
    return res


# -- summary, targets, tables, plots -------------------------------------------------------------


def _key(r: Row) -> tuple[str, int, str]:
    return r.model, r.ranks, r.link


def torch_psgd_row(group: Sequence[Row]) -> Row | None:
    """torch's PowerSGD to compare ours with: the one-bucket run, measured interleaved with
    ours, else the default-bucket one (a launch of its own)."""
    ok = {r.label: r for r in group if r.error is None and r.median_s}
    return ok.get(TORCH_PSGD_1B) or ok.get(TORCH_PSGD)


def summarize(rows: list[Row]) -> None:
    """Fill in min / median / max and the ratios to dense and to torch's PowerSGD."""
    groups: dict[tuple[str, int, str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((*_key(r), r.per_node), []).append(r)
        if r.step_s:
            r.min_s, r.median_s, r.max_s = min(r.step_s), statistics.median(r.step_s), max(r.step_s)
    for group in groups.values():
        dense = next((r for r in group if r.label == DENSE and r.median_s), None)
        tps = torch_psgd_row(group)
        for r in group:
            if r.median_s is None:
                continue
            if dense is not None and dense.median_s:
                r.vs_dense = r.median_s / dense.median_s
            if tps is not None and tps.median_s and r.label.startswith("powersgd"):
                r.vs_torch_powersgd = r.median_s / tps.median_s


def tta_summary(tta: list[TTARow]) -> list[dict[str, Any]]:
    """Per (ranks, link, label): median seconds and steps to target over seeds, ratio to dense."""
    pairs: dict[tuple[int, str], list[TTARow]] = {}
    for t in tta:
        pairs.setdefault((t.ranks, t.link), []).append(t)
    out: list[dict[str, Any]] = []
    for (ranks, link), group in pairs.items():
        summary = []
        for label, seeds in by_label(group).items():
            times = [t.time_s for t in seeds]
            reached = all(x is not None for x in times) and all(t.error is None for t in seeds)
            steps = [t.steps_to_target or 0 for t in seeds]
            summary.append(
                {
                    "ranks": ranks,
                    "link": link,
                    "label": label,
                    "seeds": len(seeds),
                    "time_s": statistics.median(x or 0.0 for x in times) if reached else None,
                    "steps": statistics.median(steps) if reached else None,
                    "accuracy_cells": accuracy_cells(seeds),
                    "error": next((t.error for t in seeds if t.error), None),
                    "vs_dense": None,
                }
            )
        dense = next((s for s in summary if s["label"] == DENSE), None)
        for s in summary:
            if dense and dense["time_s"] and s["time_s"] is not None:
                s["vs_dense"] = s["time_s"] / dense["time_s"]
        out += summary
    return out


def int8_label(labels: Sequence[str]) -> str | None:
    """The int8 variant: ``uniform:bits=8``, or ``uniform`` where that is its default."""
    if INT8 in labels:
        return INT8
    if "uniform" in labels and commhooks.parse_spec("uniform") == commhooks.parse_spec(INT8):
        return "uniform"
    return None


def _where(r: Row) -> str:
    return f"{r.model}, {r.ranks} ranks, {r.link}"


def row_targets(r: Row, int8: str | None) -> list[tuple[str, float, float | None]]:
    """(what, limit, value) of every target that applies to this row."""
    out: list[tuple[str, float, float | None]] = []
    if r.link == "100mbit" and r.label in ("sign", "ternary", "topk"):
        out.append((f"{r.label} step / dense at 100mbit", 0.15, r.vs_dense))
    if r.link == "100mbit" and r.label == int8:
        out.append(("int8 (uniform bits=8) step / dense at 100mbit", 0.35, r.vs_dense))
    if r.link == "100mbit" and r.label == INT8 + RS:
        out.append(
            ("int8, reduce-scatter transport, at 100mbit (not its default)", 0.35, r.vs_dense)
        )
    if r.label == "powersgd":
        out.append(("our powersgd step / torch's, every link", 1.0, r.vs_torch_powersgd))
        if r.link == "1gbit":
            out.append(("our powersgd step / torch's at 1gbit", 0.8, r.vs_torch_powersgd))
    if r.link == NONE and r.label in commhooks.available():
        out.append(("every compressor at its defaults, unshaped: step / dense", 1.10, r.vs_dense))
    if r.link == NONE and r.label.endswith(FALLBACK):
        out.append(("with fallback=auto, unshaped: step / dense", 1.10, r.vs_dense))
    return out


def targets(rows: list[Row], tta: list[dict[str, Any]], labels: Sequence[str]) -> list[Target]:
    int8 = int8_label(labels)
    out = []
    for r in rows:
        for what, limit, value in row_targets(r, int8):
            out.append(
                Target(what, _where(r), limit, value, None if value is None else value <= limit)
            )
    for s in tta:
        if s["link"] == "100mbit" and s["label"] not in BASELINES:
            v = s["vs_dense"]
            out.append(
                Target(
                    "time to accuracy / dense at 100mbit",
                    f"{s['label']}, {s['ranks']} ranks",
                    0.2,
                    v,
                    None if v is None else v <= 0.2,
                )
            )
    return out


def node_pairs(rows: list[Row]) -> list[tuple[Row, Row, Row | None]]:
    """(flat, hierarchical, compute-only) rows of the same spec, nodes and link."""
    out = []
    for r in rows:
        if r.label.endswith(FLAT):
            spec = r.label[: -len(FLAT)]
            same = [
                x for x in rows if (x.ranks, x.per_node, x.link) == (r.ranks, r.per_node, r.link)
            ]
            hier = next((x for x in same if x.label == spec + HIER), None)
            compute = next((x for x in same if x.label == COMPUTE), None)
            if hier is not None:
                out.append((r, hier, compute))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def node_targets(rows: list[Row]) -> list[Target]:
    """The hierarchical targets: hierarchical against flat, for the same compressor and link."""
    out = []
    for flat, hier, _ in node_pairs(rows):
        spec = flat.label[: -len(FLAT)]
        where = f"{spec}, {flat.ranks // flat.per_node}x{flat.per_node} nodes, {flat.link}"
        b = _ratio(hier.iface_tx_bytes, flat.iface_tx_bytes)
        out.append(Target("inter-node bytes, hierarchical / flat", where, 0.55, b,
                          None if b is None else b <= 0.55))  # fmt: skip
        bound = (spec, flat.link) in LINK_BOUND
        limit = 0.7 if bound else 1.05
        t = _ratio(hier.median_s, flat.median_s)
        what = "step, hierarchical / flat" + (" (link-bound)" if bound else "")
        out.append(Target(what, where, limit, t, None if t is None else t <= limit))
    return out


def node_table(rows: list[Row]) -> list[str]:
    """The "Nodes" section: flat and hierarchical side by side."""
    if not rows:
        return []
    lines = [
        "## Nodes x ranks per node: hierarchical against flat",
        "",
        "Ranks of a node share a namespace (loopback, unshaped); only the links between nodes "
        "are shaped. Step ms: min / median / max over reps (slowest rank). Inter-node MB: tx "
        "bytes per node and step on the interfaces. compute: the step under DDP's no_sync().",
        "",
        "| nodes | link | compressor | compute ms | flat ms | hier ms | hier / flat "
        "| flat MB | hier MB | hier / flat bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for flat, hier, compute in node_pairs(rows):
        spec = flat.label[: -len(FLAT)]

        def ms(r: Row | None) -> str:
            if r is None or r.error:
                return "error" if r is not None else "-"
            return f"{_ms(r.min_s)} / **{_ms(r.median_s)}** / {_ms(r.max_s)}"

        lines.append(
            f"| {flat.ranks // flat.per_node}x{flat.per_node} | {flat.link} | {spec} | "
            f"{_ms(compute.median_s) if compute else '-'} | {ms(flat)} | {ms(hier)} | "
            f"{_f(_ratio(hier.median_s, flat.median_s))} | {_mb(flat.iface_tx_bytes)} | "
            f"{_mb(hier.iface_tx_bytes)} | {_f(_ratio(hier.iface_tx_bytes, flat.iface_tx_bytes))} |"
        )
    dense = [r for r in rows if r.label == DENSE and r.median_s]
    for r in dense:
        lines.append("")
        lines.append(
            f"dense (DDP, no hook), {r.ranks // r.per_node}x{r.per_node} nodes, {r.link}: "
            f"{_ms(r.median_s)} ms, {_mb(r.iface_tx_bytes)} MB per node and step."
        )
    return [*lines, ""]


def _f(x: float | None, fmt: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _ms(x: float | None) -> str:
    return _f(None if x is None else 1e3 * x, ".1f")


def _mb(x: float | None) -> str:
    return _f(None if x is None else x / 1e6, ".4f")


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def markdown(
    cfg: Config,
    rows: list[Row],
    tta: list[dict[str, Any]],
    tgts: list[Target],
    runs: list[dict[str, Any]],
    wall: float,
    node_rows: list[Row] | None = None,
) -> str:
    pairs = [(n, link) for n in cfg.ranks for link in cfg.links]
    lines = [*node_table(node_rows or []), "## Step time / dense (median of interleaved reps)", ""]
    for name in cfg.models if pairs else ():
        lines += [
            f"**{name}**: {describe(name, cfg)}, batch {cfg.batch} per rank.",
            "",
            "| variant | EF | " + " | ".join(f"{n} ranks {link}" for n, link in pairs) + " |",
            "|---|---|" + "---|" * len(pairs),
        ]
        for label in dict.fromkeys(r.label for r in rows if r.model == name):
            cells = []
            ef: bool | None = None
            for n, link in pairs:
                r = next((r for r in rows if _key(r) == (name, n, link) and r.label == label), None)
                if r is not None and r.error_feedback is not None:
                    ef = r.error_feedback
                cells.append(
                    "-"
                    if r is None
                    else "error"
                    if r.error
                    else _f(r.vs_dense) + (" (1/rep)" if r.slow else "")
                )
            efs = "" if ef is None else ("on" if ef else "off")
            lines.append(f"| {label} | {efs} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "(1/rep): one timed step per rep (its build step took over "
        f"{cfg.slow_s:g} s), else {cfg.warmup} warm-up + {cfg.steps} timed. error: see the "
        "details.",
        "",
        "## Targets",
        "",
        "| target | where | limit | value | met |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t.what} | {t.where} | ≤{t.limit:g} | {_f(t.value)} | {_met(t.met)} |" for t in tgts
    ]
    met = [t.met for t in tgts if t.met is not None]
    lines += ["", f"{sum(met)} of {len(met)} met ({len(tgts) - len(met)} not measurable).", ""]
    if tta:
        lines += [
            f"## Time to accuracy: digits, test accuracy ≥ {cfg.tta_target:g}%",
            "",
            f"MLP 64-{cfg.tta_hidden}-{cfg.tta_hidden}-10, IID split, batch {cfg.batch} per "
            f"rank, SGD lr {cfg.tta_lr:g} momentum 0.9; at most {cfg.tta_max_steps} steps or "
            f"{cfg.tta_max_s:g} s of training; {cfg.tta_seeds} seed(s), median.",
            "",
            "| ranks | link | variant | s to target | / dense | steps to target "
            "| last acc % (mean) | min / max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in tta:
            t = "error" if s["error"] else _f(s["time_s"], ".2f", "not reached")
            lines.append(
                f"| {s['ranks']} | {s['link']} | {s['label']} | {t} | {_f(s['vs_dense'])} | "
                f"{_f(s['steps'], '.0f', '-')} | {s['accuracy_cells']} |"
            )
        lines.append("")
    lines += [
        "## Details: step time and wire bytes per rank and step",
        "",
        "Wire: handed to collectives (hook: our CommStats; analytic: from the parameters). "
        "Link est.: what that implies on the link for ring collectives. Interface: measured tx "
        "bytes over one window of the variant's steps, mean over the namespaces' interfaces.",
        "",
        "| model | ranks | link | variant | step ms (median) | min / max | steps/rep | / dense "
        "| / torch-powersgd | wire MB | source | link est. MB | interface tx MB "
        "| interface / est. | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    int8 = int8_label(cfg.variants)
    for r in rows:
        if r.error:
            lines.append(
                f"| {r.model} | {r.ranks} | {r.link} | {r.label} | error: "
                f"{r.error.replace('|', '/')[:120]} |" + " |" * 10
            )
            continue
        tcell = "; ".join(
            f"≤{limit:g}: {_met(None if v is None else v <= limit)}"
            for _, limit, v in row_targets(r, int8)
        )
        if r.fallback:
            tcell = f"{tcell} ({r.fallback})" if tcell else f"({r.fallback})"
        lines.append(
            f"| {r.model} | {r.ranks} | {r.link} | {r.label} | {_ms(r.median_s)} | "
            f"{_ms(r.min_s)} / {_ms(r.max_s)} | "
            f"{r.steps} | {_f(r.vs_dense)} | {_f(r.vs_torch_powersgd)} | {_mb(r.wire_bytes)} | "
            f"{r.wire_source} | {_mb(r.link_est_bytes)} | {_mb(r.iface_tx_bytes)} | "
            f"{_f(r.iface_vs_est)} | {tcell} |"
        )
    failed = [f"{r['ranks']} ranks {r['link']}: {r['error']}" for r in runs if r.get("error")]
    lines += [
        "",
        f"gloo over TCP in network namespaces (tc tbf rate shaping, no delay), one rank and one "
        f"thread per namespace, torch {torch.__version__}, {os.cpu_count()} cores. Reps: "
        f"{cfg.reps}, interleaved. Step time: slowest rank's. Total wall time {wall:.0f} s.",
    ]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return "\n".join(lines)


def plot(cfg: Config, rows: list[Row], tta: list[TTARow], out: str) -> list[str]:
    """``step_time.png`` (ratio to dense, log scale) and, with time to accuracy, ``tta.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    def plain(axis: Any) -> None:  # 0.1, 0.2, 0.5, 1 on a log axis, not crowded 10^x labels
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())

    paths = []
    models = [m for m in cfg.models if any(r.model == m for r in rows)] or list(cfg.models)
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 4 * len(models)), squeeze=False)
    pairs = [(n, link) for n in cfg.ranks for link in cfg.links]
    for ax, name in zip(axes[:, 0], models):
        labels = list(dict.fromkeys(r.label for r in rows if r.model == name))
        width = 0.8 / max(1, len(pairs))
        for j, (n, link) in enumerate(pairs):
            xs, ys = [], []
            for i, label in enumerate(labels):
                r = next((r for r in rows if _key(r) == (name, n, link) and r.label == label), None)
                if r is not None and r.vs_dense:
                    xs.append(i + (j - (len(pairs) - 1) / 2) * width)
                    ys.append(r.vs_dense)
            ax.bar(xs, ys, width=width, label=f"{n} ranks, {link}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        plain(ax.yaxis)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_ylabel("step time / dense")
        ax.set_title(describe(name, cfg))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "step_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if tta:
        keys = list(dict.fromkeys((t.ranks, t.link) for t in tta))
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, (n, link) in zip(axes[0], keys):
            for t in tta:
                if (t.ranks, t.link) == (n, link) and t.seed == cfg.seed and t.curve_s:
                    ax.plot(t.curve_s, t.curve_acc, marker=".", label=t.label)
            ax.axhline(cfg.tta_target, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            plain(ax.xaxis)
            ax.set_xlabel("training seconds (log scale)")
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"digits, {n} ranks, {link}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, "tta.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# -- command line -------------------------------------------------------------------------------


def default_variants() -> list[str]:
    labels = [DENSE, TORCH_FP16, TORCH_BF16, TORCH_PSGD, *commhooks.available()]
    if int8_label(labels) is None:  # uniform's default is not 8 bits: int8 is a variant of its own
        labels.append(INT8)
    return labels + [INT8 + RS] + [spec + FALLBACK for spec in FALLBACK_SPECS]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="*", default=None, help="ranks (2 4; none: skip)")
    ap.add_argument(
        "--links", nargs="+", default=None, help="tc rates or 'none' (100mbit 1gbit none)"
    )
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None, help="(mlp conv)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=f"labels ({', '.join(BASELINES)}) or commhooks specs; default: all, with "
        f"{INT8}; {DENSE} is always added",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per rep (3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per rep (1)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved reps (3)")
    ap.add_argument("--slow-s", type=float, default=None, help="slower build step: 1 step/rep")
    ap.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time to accuracy on digits (on)",
    )
    ap.add_argument("--tta-target", type=float, default=None, help="test accuracy %% (90)")
    ap.add_argument("--tta-seeds", type=int, default=None, help="seeds per variant (1)")
    ap.add_argument("--timeout-s", type=float, default=None, help="per (ranks, link) (1800)")
    ap.add_argument(
        "--nodes", nargs="*", default=None, help="<nodes>x<ranks per node> runs (2x2; none: skip)"
    )
    ap.add_argument("--node-links", nargs="+", default=None, help="(100mbit 1gbit)")
    ap.add_argument("--node-variants", nargs="+", default=None, help="labels, as --variants")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 ranks, 100mbit, <1 min")
    ap.add_argument("--out", default="bench-out", help="folder for e2e.json, e2e.md, PNGs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def config_from_args(args: argparse.Namespace) -> Config:
    from commhooks.launch.netns import Link

    base = SMOKE if args.smoke else Config()
    over: dict[str, Any] = {}
    names = {f.name for f in fields(Config)}
    for name, value in vars(args).items():
        if name in names and value is not None:
            over[name] = tuple(value) if isinstance(value, list) else value
    cfg = replace(base, **over)
    variants = list(cfg.variants or default_variants())
    if DENSE not in variants:
        variants.insert(0, DENSE)
    for label in variants:
        if label not in BASELINES:
            commhooks.parse_spec(our_spec(label)[0])  # a bad spec fails before any namespace
    for link in cfg.links:
        if link != NONE:
            Link(link)
    for n in cfg.ranks:
        if not 2 <= n <= 64:
            raise ValueError(f"--ranks {n}: must be in [2, 64]")
    for spec in cfg.nodes:
        parts = spec.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 2:
            raise ValueError(f"--nodes {spec}: expected <nodes>x<ranks per node>, e.g. 2x2")
    for link in cfg.node_links:
        Link(link)
    for label in cfg.node_variants:
        if label not in BASELINES:
            commhooks.parse_spec(our_spec(label)[0])
    tta_variants = tuple(v for v in cfg.tta_variants if v in variants)
    return replace(cfg, variants=tuple(variants), tta_variants=tta_variants)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"e2e.py: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "e2e.py: needs root: every rank runs in a network namespace behind tc shaping "
            "(ip netns, tc). Run it as root (sudo make bench).",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    print(
        f"e2e: {len(cfg.variants)} variants x {len(cfg.models)} models on "
        f"{len(cfg.ranks) * len(cfg.links)} (ranks, link) pairs; time to accuracy: "
        f"{', '.join(cfg.tta_variants) if cfg.tta else 'off'}; {len(cfg.node_variants)} "
        f"variants on {len(cfg.nodes) * len(cfg.node_links)} (nodes, link) pairs",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    rows: list[Row] = []
    tta: list[TTARow] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        for n in cfg.ranks:
            for link in cfg.links:
                try:
                    res = run_pair(cfg, n, link, tmp)
                except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                    print(f"[{n} ranks, {link}] failed: {_error(e)}", file=sys.stderr, flush=True)
                    runs.append({"ranks": n, "link": link, "error": _error(e), "wall_s": None})
                    continue
                rows += res["rows"]
                tta += res["tta"]
                runs.append({"ranks": n, "link": link, "error": None, "wall_s": res["wall_s"]})
        node_rows: list[Row] = []
        for spec in cfg.nodes:
            for link in cfg.node_links:
                try:
                    res = run_nodes(cfg, spec, link, tmp)
                except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                    print(
                        f"[{spec} nodes, {link}] failed: {_error(e)}", file=sys.stderr, flush=True
                    )
                    runs.append({"ranks": spec, "link": link, "error": _error(e), "wall_s": None})
                    continue
                node_rows += res["rows"]
                runs.append({"ranks": spec, "link": link, "error": None, "wall_s": res["wall_s"]})
    summarize(rows)
    summarize(node_rows)
    tta_rows = tta_summary(tta)
    tgts = node_targets(node_rows) + targets(rows, tta_rows, cfg.variants)
    wall = time.perf_counter() - t0
    md = markdown(cfg, rows, tta_rows, tgts, runs, wall, node_rows)
    data = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "models": {
            m: {"describe": describe(m, cfg), "params": count_params(m, cfg)} for m in cfg.models
        },
        "wall_s": wall,
        "runs": runs,
        "rows": [asdict(r) for r in rows],
        "node_rows": [asdict(r) for r in node_rows],
        "tta": [asdict(t) for t in tta],
        "tta_summary": tta_rows,
        "targets": [asdict(t) for t in tgts],
    }
    write(md, data, os.path.join(args.out, "e2e.md"), os.path.join(args.out, "e2e.json"))
    for path in plot(cfg, rows, tta, args.out) if rows else ():
        print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r["error"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
