"""What each rank builds: the models, their synthetic batches, and the variants (a DDP
model with a hook, or one of the baselines) that the measurement runs. See ``e2e.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from _report import parse_variant
from ddp_step import mlp, n_params
from e2e_config import (
    BASELINES,
    COMPUTE,
    DENSE,
    FLAT,
    HIER,
    INT8,
    TORCH_BF16,
    TORCH_FP16,
    TORCH_PSGD,
    TORCH_PSGD_1B,
    TORCH_PSGD_START,
    Config,
)
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

import commhooks
import commhooks.ddp
from commhooks.ddp import CompressionState

__all__ = [
    "FALLBACK",
    "FALLBACK_SPECS",
    "Loss",
    "RS",
    "SUFFIXES",
    "Variant",
    "build_model",
    "convnet",
    "count_params",
    "describe",
    "make_batches",
    "one_bucket_mb",
    "our_powersgd_rank",
    "our_spec",
    "torch_powersgd_bytes",
]


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
