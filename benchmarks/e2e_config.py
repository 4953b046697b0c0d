"""The end-to-end benchmark's vocabulary: variant labels and constants, the run's
:class:`Config`, and the records the ranks send back (:class:`Row`, :class:`TTARow`) and the
report checks (:class:`Target`). See ``e2e.py`` for what is measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BASELINES",
    "COMPUTE",
    "Config",
    "DENSE",
    "FAIL_GRACE_S",
    "FLAT",
    "HIER",
    "INT8",
    "LINK_BOUND",
    "MARK_TIMEOUT_S",
    "MODELS",
    "NODE_SPECS",
    "NODE_VARIANTS",
    "NONE",
    "Row",
    "SMOKE",
    "SMOKE_VARIANTS",
    "TORCH_BF16",
    "TORCH_FP16",
    "TORCH_PSGD",
    "TORCH_PSGD_1B",
    "TORCH_PSGD_START",
    "TTARow",
    "TTA_VARIANTS",
    "Target",
]

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
