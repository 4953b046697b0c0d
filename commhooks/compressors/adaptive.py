"""Adaptive-bit uniform quantization: per-key running ranges and a bit budget shared by all keys.

For every key the compressor keeps exponentially decayed running statistics of the tensor's
minimum, maximum and variance. Each call quantizes uniformly over the running range
``[lo, hi]`` (values outside are clamped) with ``b`` bits, where ``b`` comes from reverse
water-filling of a per-element bit budget across keys::

    b_i = clip(round(budget + 0.5 * log2(v_i / G)), min_bits, max_bits)

``v_i`` is the key's running variance and ``G`` the numel-weighted geometric mean of the
running variances of every key seen so far (keys with zero variance left out). Before
rounding and clipping, the numel-weighted mean of ``b_i`` is exactly ``budget``; a tensor with
four times the variance of the typical one gets one bit more, as rate-distortion theory
prescribes for equal distortion weights.

Wire format (``n`` elements, ``b`` bits chosen for this call):

* header: 1 uint8, ``b`` (1..8);
* range: 2 fp32, ``lo`` and ``hi`` (both NaN when the input was non-finite);
* codes: ``n`` codes of alphabet ``2**b`` through
  :func:`~commhooks.coding.symbols.encode_symbols`, ``ceil(n * b / 8)`` bytes packed.

Code ``k`` decodes to ``lo + k * (hi - lo) / (2**b - 1)`` (computed from the midpoint and half
steps, so any finite fp32 range decodes finite). A payload costs ``9 + ceil(n * b / 8)`` bytes
without entropy coding. Bits and range vary
per rank and per step, which is why both travel in the payload rather than in the context.

Choosing ``b`` needs the running statistics on the host, so each :meth:`compress` reads its
statistics back from the device in one copy (the fused kernels' first call for a key reads one
element more, the pivot of their variance sums). A decode of 8 codes or more that are not
entropy coded reads nothing: the packed codes' size gives ``b``. Otherwise it reads the header.
The range is fp32 for every input dtype; fp64 tensors beyond fp32's range (3.4e38) get an
infinite range and decode non-finite.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_int, check_real
from commhooks.coding.bitpack import packed_size, symbol_packing
from commhooks.coding.symbols import decode_symbols, encode_symbols
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Kind,
    Payload,
    compute_dtype,
)
from commhooks.feedback.residual import safely_finite
from commhooks.kernels import Backend, FusedCodec
from commhooks.registry import register

__all__ = ["Adaptive", "AdaptiveConfig", "RunningStats"]


@dataclass(frozen=True)
class AdaptiveConfig(CompressorConfig):
    """Uniform quantization over running ranges with per-key bits from a shared budget.

    Args:
        budget: target average bits per element over all keys (numel-weighted), 1..8 and
            within ``[min_bits, max_bits]``.
        min_bits: fewest bits any tensor gets, 1..8.
        max_bits: most bits any tensor gets, ``min_bits``..8.
        decay: weight of the old statistics in each update, in ``[0, 1)``; 0 tracks only the
            current tensor, values near 1 average over about ``1 / (1 - decay)`` steps.
        stochastic: round to one of the two nearest levels at random (unbiased for values
            inside the running range) instead of to the nearest one.
        entropy: entropy-code the codes (data-dependent size, like the bits themselves).
        seed: seed of the private generator used by stochastic rounding.

    Tuning: give the budget you would give ``uniform`` and let the allocation move bits to
    the tensors that vary most. Keep ``decay`` at 0.9 for gradients whose scale drifts
    slowly; lower it when the scale jumps (warm-up, learning-rate drops), since a lagging
    range clamps values (bias) or wastes levels. Clamping makes this compressor biased: use it
    with error feedback. Pass stable keys; ``key=None`` quantizes over the tensor's own range
    and stores nothing.
    """

    name: ClassVar[str] = "adaptive"
    budget: float = 4.0
    min_bits: int = 1
    max_bits: int = 8
    decay: float = 0.9
    stochastic: bool = False
    entropy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_real("budget", self.budget, 1.0, 8.0)
        check_int("min_bits", self.min_bits, lo=1, hi=8)
        check_int("max_bits", self.max_bits, lo=1, hi=8)
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits={self.min_bits}: must be <= max_bits={self.max_bits}")
        if not self.min_bits <= self.budget <= self.max_bits:
            raise ValueError(
                f"budget={self.budget}: must lie within [min_bits, max_bits] = "
                f"[{self.min_bits}, {self.max_bits}], or the average can never meet it"
            )
        check_real("decay", self.decay, 0.0, 1.0, hi_open=True)
        for field in ("stochastic", "entropy"):
            check_bool(field, getattr(self, field))
        check_int("seed", self.seed)


@dataclass
class RunningStats:
    """One key's decayed statistics (host floats) and its latest element count."""

    lo: float
    hi: float
    var: float
    numel: int

    def weight(self) -> tuple[int, float]:
        """This key's terms ``(n, n * log2 v)`` in the geometric mean (none for ``v == 0``)."""
        if self.var <= 0.0:
            return 0, 0.0
        return self.numel, self.numel * math.log2(self.var)


@register(AdaptiveConfig)
class Adaptive(Compressor[AdaptiveConfig]):
    """Adaptive-bit uniform quantizer; see :class:`AdaptiveConfig`."""

    def __init__(self, config: AdaptiveConfig) -> None:
        super().__init__(config)
        self.kernels = AdaptiveKernels(self)
        self._stats: dict[str, RunningStats] = {}
        # Running sums behind G, updated per call (a full pass per call would be O(keys));
        # rebuilt exactly every so often so that floating-point drift cannot build up.
        self._sum_n = 0
        self._sum_nlog = 0.0
        self._updates = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.QUANTIZER,
            summable=False,
            static_size=False,
            unbiased=False,
            stateful=True,
        )

    def stats(self, key: str) -> RunningStats | None:
        """A copy of ``key``'s running statistics, or None before its first finite call."""
        s = self._stats.get(key)
        return None if s is None else RunningStats(s.lo, s.hi, s.var, s.numel)

    def bits_for(self, var: float, extra: tuple[int, float] = (0, 0.0)) -> int:
        """Bits for a running variance ``var`` given the stored keys (plus ``extra`` terms)."""
        cfg = self.config
        sum_n = self._sum_n + extra[0]
        if sum_n == 0:
            target = cfg.budget
        elif var <= 0.0:
            return cfg.min_bits
        else:
            log_g = (self._sum_nlog + extra[1]) / sum_n
            target = cfg.budget + 0.5 * (math.log2(var) - log_g)
        return min(max(math.floor(target + 0.5), cfg.min_bits), cfg.max_bits)

    def _plan(
        self, key: str | None, cur_lo: float, cur_hi: float, cur_var: float, n: int
    ) -> tuple[int, float, float]:
        """Fold this call's finite statistics into ``key``'s; returns (bits, lo, hi)."""
        if not math.isfinite(cur_var):
            # Finite data whose variance overflowed the compute dtype: (range / 2)^2 bounds
            # it, in host fp64.
            half = (cur_hi - cur_lo) / 2
            cur_var = half * half
        cur_var = min(cur_var, sys.float_info.max)
        stats = self._update(key, RunningStats(cur_lo, cur_hi, cur_var, n))
        extra = stats.weight() if key is None else (0, 0.0)
        return self.bits_for(stats.var, extra), stats.lo, stats.hi

    # -- torch path -----------------------------------------------------------------------------

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        cfg = self.config
        flat = tensor.reshape(-1).to(compute_dtype(tensor.dtype))
        n = flat.numel()
        lo_t, hi_t = torch.aminmax(flat)
        # The one host sync: the bit width decides the payload size.
        cur_lo, cur_hi, cur_var = torch.stack([lo_t, hi_t, flat.var(correction=0)]).tolist()
        if not (math.isfinite(cur_lo) and math.isfinite(cur_hi)):
            # aminmax propagates NaN and sees every inf. GradScaler will skip this step, so the
            # running statistics stay as they were and the cheapest payload will do: a NaN
            # range decodes to NaN everywhere.
            bits, lo, hi = cfg.min_bits, math.nan, math.nan
        else:
            bits, lo, hi = self._plan(key, cur_lo, cur_hi, cur_var, n)
        dev = flat.device
        rng = torch.tensor([lo, hi], dtype=torch.float32, device=dev)
        top = (1 << bits) - 1
        mid, half_step = _grid(rng.to(flat.dtype), top)
        # Code k decodes to mid + (2k - top) * half_step. Working from the midpoint with half
        # steps keeps every finite range finite: hi - lo itself can overflow. A zero-width
        # range gives +-inf or 0/0 here; any code decodes to lo then.
        q = (flat - mid).div_(half_step).add_(top).mul_(0.5).nan_to_num_(0.0, float(top), 0.0)
        if cfg.stochastic:
            q.add_(torch.rand(q.shape, generator=self.generator(dev), device=dev, dtype=q.dtype))
            q.floor_()
        else:
            q.round_()
        codes = q.clamp_(0, top).to(torch.int64)
        data = encode_symbols(codes, top + 1, use_entropy=cfg.entropy)
        head = torch.tensor([bits], dtype=torch.uint8, device=dev)
        return (head, rng, data), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        head, rng, data = payload
        bits = _width(head, data, ctx.numel, coded=self.config.entropy)
        if not 1 <= bits <= 8:
            raise ValueError(
                f"payload: header says {int(head[0])} bits, codes take {data.numel()} bytes "
                f"for {ctx.numel} elements; no width in 1..8 fits"
            )
        top = (1 << bits) - 1
        mid, half_step = _grid(rng.to(compute_dtype(ctx.dtype)), top)
        codes = decode_symbols(data, top + 1, ctx.numel, use_entropy=self.config.entropy)
        return torch.addcmul(mid, codes.to(mid.dtype).mul_(2).sub_(top), half_step)

    # -- running statistics -------------------------------------------------------------------

    def _update(self, key: str | None, current: RunningStats) -> RunningStats:
        """Fold finite ``current`` statistics into ``key``'s; returns the updated ones."""
        if key is None:
            return current
        old = self._stats.get(key)
        if old is None:
            new = current
        else:
            d = self.config.decay
            new = RunningStats(
                d * old.lo + (1 - d) * current.lo,
                d * old.hi + (1 - d) * current.hi,
                d * old.var + (1 - d) * current.var,
                current.numel,
            )
        self._stats[key] = new
        self._reweigh(old, new)
        return new

    def _reweigh(self, old: RunningStats | None, new: RunningStats) -> None:
        self._updates += 1
        if self._updates >= max(64, len(self._stats)):
            self._recount()
            return
        if old is not None:
            n, nl = old.weight()
            self._sum_n -= n
            self._sum_nlog -= nl
        n, nl = new.weight()
        self._sum_n += n
        self._sum_nlog += nl

    def _recount(self) -> None:
        weights = [s.weight() for s in self._stats.values()]
        self._sum_n = sum(n for n, _ in weights)
        self._sum_nlog = math.fsum(nl for _, nl in weights)
        self._updates = 0

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base state plus per-key ``(lo, hi, var, numel)`` and the sums behind ``G``."""
        state = super().state_dict()
        state["stats"] = {k: (s.lo, s.hi, s.var, s.numel) for k, s in self._stats.items()}
        state["geomean"] = (self._sum_n, self._sum_nlog, self._updates)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._stats = {
            k: RunningStats(float(lo), float(hi), float(var), int(n))
            for k, (lo, hi, var, n) in state["stats"].items()
        }
        if "geomean" in state:
            sum_n, sum_nlog, updates = state["geomean"]
            self._sum_n, self._sum_nlog, self._updates = int(sum_n), float(sum_nlog), int(updates)
        else:
            self._recount()


def _read_back(values: list[float | Tensor]) -> list[float]:
    """``values`` as Python floats, the tensors among them read back in one copy."""
    tensors = [v.double().reshape(()) for v in values if isinstance(v, Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


#: from this many codes on, every bit width packs them into a different number of bytes
_WIDTH_FROM_SIZE = 8


def _width(head: Tensor, data: Tensor, n: int, *, coded: bool) -> int:
    """A payload's bit width (0 when no width fits). Packed codes of ``n >= 8`` elements take
    ``ceil(n * b / 8)`` bytes, a different count for every ``b``, so their size (known on the
    host) gives the width without reading the header back from the device. Entropy-coded or
    fewer codes: the header is read."""
    if coded or n < _WIDTH_FROM_SIZE:
        return int(head[0])
    size = data.numel()
    return next((b for b in range(1, 9) if packed_size(n, symbol_packing(1 << b)) == size), 0)


def _grid(rng: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """Midpoint and half step of ``top + 1`` levels spanning ``rng = [lo, hi]``, computed from
    halves so that no finite range overflows."""
    lo, hi = rng[0] * 0.5, rng[1] * 0.5
    return lo + hi, (hi - lo) / top


class AdaptiveKernels(FusedCodec):
    """Adaptive's nearest-rounding grid codes in fused kernels: one statistics pass (range
    and variance, which set the bit width), one pass for codes and residual."""

    op = "stochastic"
    arity = 3
    owner: Adaptive

    def enabled(self) -> bool:
        cfg = self.owner.config
        return not (cfg.stochastic or cfg.entropy)

    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        """The payload; None (nothing written, the running statistics untouched) unless the
        data and the running range are safely finite."""
        owner = self.owner
        key = owner._active
        n = g.numel()
        old = owner._stats.get(key) if key is not None else None
        # Safely finite everywhere, c - decode(code) stays finite: the residual needs no undo.
        if old is not None and not safely_finite(0.0, max(abs(old.lo), abs(old.hi))):
            return None
        # Sums of d = c - pivot, the pivot near the mean (the running range's centre, else the
        # first element), so that E[d^2] - E[d]^2 does not cancel when the mean dominates.
        pivot = (
            (old.lo + old.hi) / 2 if old is not None else float(g[0] + (0 if e is None else e[0]))
        )
        st = ops.chunk_stats(g, e, n, minmax=True, squares=True, pivot=pivot, host=False)
        assert st.sumsq is not None and st.lo is not None and st.hi is not None
        # The encode's one host read, on every backend: whether c is safely finite, and the
        # statistics the bit width (so the payload's size) follows from.
        total, amax, cur_lo, cur_hi, sumsq = _read_back(
            [st.total, st.amax, st.lo[0], st.hi[0], st.sumsq[0]]
        )
        if not safely_finite(total, amax):
            return None
        # fp32 lane sums gathered in fp64: torch's var() to about 1e-6 relative, not bit for
        # bit, so the stored running variance differs in its low digits and the bit width can
        # differ where its target sits within that of a rounding boundary (the payload is then
        # valid, one width apart). Squares past fp32 (|d| > 1.8e19) fall back to the range.
        mean = total / n
        var = max(sumsq / n - mean * mean, 0.0)
        bits, lo, hi = owner._plan(key, cur_lo, cur_hi, var, n)
        rng = torch.tensor([lo, hi], dtype=torch.float32)
        grid = torch.stack(_grid(rng, (1 << bits) - 1)).to(g.device)
        data = ops.grid_encode(g, e, grid, bits)
        head = torch.tensor([bits], dtype=torch.uint8)
        return head.to(g.device), rng.to(g.device), data

    def sized(self, payload: Payload, n: int) -> bool:
        head, rng, data = payload
        if head.numel() != 1 or rng.numel() != 2 or rng.dtype != torch.float32:
            return False
        bits = _width(head, data, n, coded=False)
        return 1 <= bits <= 8 and data.numel() == packed_size(n, symbol_packing(1 << bits))

    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        head, rng, data = payload
        bits = _width(head, data, n, coded=False)
        top = (1 << bits) - 1
        grid = torch.stack(_grid(rng, top))
        packing = symbol_packing(top + 1)
        return ops.stochastic_decode(data, n, n, grid, top, top + 1, packing, out, kind=2)
