"""Non-uniform quantization: sign plus a magnitude level from a fixed or fitted table.

Each chunk is scaled by its largest magnitude ``s = max|x|``, so magnitudes ``u = |x| / s`` lie
in ``[0, 1]``, and ``u`` is rounded to one of ``L = 2**(bits-1)`` levels, a sorted table that
always holds 0 and 1. Three tables share one code path:

* ``log``: powers of two ``{0, 2**-(L-2), ..., 1/2, 1}`` (relative precision for small values);
* ``mulaw``: mu-law companding points ``((1+mu)**(j/(L-1)) - 1) / mu``;
* ``quantile``: levels at the ``j/(L-1)`` quantiles of a sample of ``u``, refitted every
  ``refit_every`` calls per key (equal-mass bins: each level covers about the same number of
  elements, so level indices carry close to ``bits - 1`` bits of information).

Wire format (``n`` elements, ``c = ceil(n / chunk)`` chunks):

* symbols ``2 * level + sign`` (sign 1 for negatives, 0 for level 0), ``bits`` bits each, packed
  by :func:`~commhooks.coding.symbols.encode_symbols`: ``ceil(n * bits / 8)`` bytes (data
  dependent with ``entropy=True``);
* per-chunk scales: ``c`` fp32 values (fp64 for fp64 input);
* ``quantile`` only: the ``L`` fitted levels as fp32 (``4 * L`` bytes). They are rank-local
  (fitted to this rank's data), so they travel with the payload and any rank can decode any
  other's; fp32 rather than fp16 because fitted levels of heavy-tailed gradients sit far
  below fp16's normal range, and the cost is at most 512 bytes per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from commhooks._validate import check_bool, check_choice, check_int, check_real
from commhooks.coding.symbols import decode_symbols, encode_symbols
from commhooks.compressors._quant import chunked, unchunk
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Kind,
    Payload,
    compute_dtype,
)
from commhooks.feedback.residual import on_device, refuses
from commhooks.kernels import Backend, FusedCodec
from commhooks.registry import register

__all__ = ["NonUniform", "NonUniformConfig", "level_table", "quantize_to_levels"]

LevelKind = Literal["log", "mulaw", "quantile"]
_LEVEL_KINDS = ("log", "mulaw", "quantile")
# Bit widths the fused native kernels pack (whole symbols per byte).
_NATIVE = (2, 4, 8)


@dataclass(frozen=True)
class NonUniformConfig(CompressorConfig):
    """Sign plus non-uniform magnitude levels, per-chunk max-abs scaling.

    Args:
        bits: bits per element, 2..8: one sign bit and ``bits - 1`` bits for one of
            ``L = 2**(bits-1)`` magnitude levels in ``[0, 1]`` (0 and 1 always included).
        levels: the level table: ``log`` (powers of two), ``mulaw`` (mu-law companding) or
            ``quantile`` (fitted to the data, sent in the payload, stateful per key).
        chunk: elements per chunk; each chunk has its own scale ``max|x|``.
        mu: mu-law parameter, > 0 (``mulaw`` only); larger crowds levels towards zero.
        sample: at most this many magnitudes, drawn with the private generator, are sorted
            to fit ``quantile`` levels.
        refit_every: ``quantile`` levels are refitted on every ``refit_every``-th call per key
            (every call when ``key`` is None) and reused in between.
        stochastic: round to one of the two bracketing levels at random, unbiased, instead of
            to the nearest one.
        entropy: entropy-code the symbols (smaller for skewed level usage, size becomes
            data-dependent).
        seed: seed of the private generator (stochastic rounding, quantile sampling).

    Tuning: gradients are heavy-tailed, so most magnitudes sit far below the chunk maximum;
    ``log`` keeps their relative precision and suits error-feedback-free training at 4-5 bits,
    ``mulaw`` (mu 255, as in audio) is a smoother middle ground, and ``quantile`` adapts to the
    actual distribution at the price of ``4 * L`` payload bytes and one sort per refit.
    Quantile levels are equal-mass, not minimum-squared-error: they code the typical element
    best (lowest median relative error) but leave wide gaps among the few largest ones, which
    dominate the squared error, so on heavy-tailed data ``log`` or ``mulaw`` give a lower
    total squared error; prefer them unless error feedback absorbs the large-value error. Use
    ``stochastic=True`` without error feedback, deterministic rounding with it. On
    Gaussian-like data at 4 bits, ``entropy`` saves about 0.5 (``log``) to 0.7 (``mulaw``) bits
    per element and only about 0.25 with ``quantile``, whose levels are evenly used by design.
    """

    name: ClassVar[str] = "nonuniform"
    bits: int = 4
    levels: LevelKind = "log"
    chunk: int = 2048
    mu: float = 255.0
    sample: int = 65536
    refit_every: int = 100
    stochastic: bool = False
    entropy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("bits", self.bits, lo=2, hi=8)
        check_choice("levels", self.levels, _LEVEL_KINDS)
        check_int("chunk", self.chunk, lo=1)
        check_real("mu", self.mu, lo=0.0, lo_open=True)
        check_int("sample", self.sample, lo=1)
        check_int("refit_every", self.refit_every, lo=1)
        for field in ("stochastic", "entropy"):
            check_bool(field, getattr(self, field))
        check_int("seed", self.seed)


def level_table(
    kind: str,
    bits: int,
    mu: float = 255.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The fixed sorted magnitude table of ``log`` or ``mulaw`` levels: ``2**(bits-1)`` values
    from 0 to 1 inclusive, computed in fp64 and rounded once to ``dtype``."""
    count = 1 << (bits - 1)
    if kind == "log":
        vals = [0.0] + [2.0**k for k in range(-(count - 2), 1)]
    elif kind == "mulaw":
        # expm1/log1p stay accurate for tiny mu, where (1+mu)**t - 1 cancels to zero.
        scale = math.log1p(mu)
        vals = [math.expm1(j / (count - 1) * scale) / mu for j in range(count)]
        vals[0], vals[-1] = 0.0, 1.0
    else:
        raise ValueError(f"levels={kind!r}: only 'log' and 'mulaw' have a fixed table")
    return torch.tensor(vals, dtype=torch.float64).to(device=device, dtype=dtype)


def quantize_to_levels(u: Tensor, levels: Tensor, generator: torch.Generator | None) -> Tensor:
    """Indices into the sorted ``levels`` (holding 0 and 1) for magnitudes ``u`` in ``[0, 1]``.

    Without a generator: the nearest level (a search on the midpoints; ties round down). With
    one: the upper of the two bracketing levels with probability ``(u - lo) / (hi - lo)``, so
    the level's expectation is ``u``.
    """
    u = u.contiguous()
    if generator is None:
        mids = (levels[:-1] + levels[1:]) * 0.5
        return torch.searchsorted(mids, u)
    top = levels.numel() - 2
    below = (torch.searchsorted(levels, u, right=True) - 1).clamp_(0, top)
    lo = levels[below]
    gap = levels[below + 1] - lo
    # Repeated fitted levels give empty brackets; their lower end is exact already.
    prob = torch.where(gap > 0, (u - lo) / gap, torch.zeros_like(u))
    draw = torch.rand(u.shape, generator=generator, device=u.device, dtype=u.dtype)
    return below + (draw < prob)


@register(NonUniformConfig)
class NonUniform(Compressor[NonUniformConfig]):
    """Non-uniform (log, mu-law or quantile-fitted) quantizer; see :class:`NonUniformConfig`."""

    def __init__(self, config: NonUniformConfig) -> None:
        super().__init__(config)
        self.kernels = NonUniformKernels(self)
        self._levels: dict[str, Tensor] = {}  # quantile: per-key fitted levels (fp32)
        self._calls: dict[str, int] = {}  # quantile: per-key call counter for refits
        self._tables: dict[tuple[str, torch.dtype], Tensor] = {}  # fixed tables, cached

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            kind=Kind.QUANTIZER,
            summable=False,
            static_size=not self.config.entropy,
            unbiased=self.config.stochastic,
            stateful=self.config.levels == "quantile",
        )

    @property
    def num_levels(self) -> int:
        """``L``, the number of magnitude levels."""
        return 1 << (self.config.bits - 1)

    # -- torch path -----------------------------------------------------------------------------

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        cfg = self.config
        flat = tensor.reshape(-1).to(compute_dtype(tensor.dtype))
        n = flat.numel()
        rows = chunked(flat, cfg.chunk)
        # amax propagates NaN and an inf makes the scale inf; either decodes non-finite
        # (level * inf, 0 * inf, NaN), which is how GradScaler hears about it.
        u = rows.abs()
        scales = u.amax(1)
        u.div_(scales[:, None]).nan_to_num_(0.0, 1.0, 0.0).clamp_(0.0, 1.0)
        extra: tuple[Tensor, ...] = ()
        if cfg.levels == "quantile":
            fitted = self._quantile_levels(unchunk(u, n), scales, key)
            levels = fitted.to(flat.dtype)
            extra = (fitted,)
        else:
            levels = self._table(flat.device, flat.dtype)
        gen = self.generator(flat.device) if cfg.stochastic else None
        idx = quantize_to_levels(u, levels, gen)
        # Level 0 has no sign: always sending 0 there helps the entropy coder.
        negative = (rows < 0) & (idx > 0)
        symbols = unchunk(idx * 2 + negative, n)
        data = encode_symbols(symbols, 2 * self.num_levels, use_entropy=cfg.entropy)
        return (data, scales, *extra), None

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        cfg = self.config
        data, scales = payload[0], payload[1]
        if cfg.levels == "quantile":
            levels = payload[2].to(scales.dtype)
        else:
            levels = self._table(scales.device, scales.dtype)
        symbols = decode_symbols(data, 2 * self.num_levels, ctx.numel, use_entropy=cfg.entropy)
        mag = levels[symbols >> 1]
        vals = torch.where((symbols & 1).bool(), -mag, mag)
        return unchunk(chunked(vals, cfg.chunk) * scales[:, None], ctx.numel)

    def _table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        slot = (str(device), dtype)
        table = self._tables.get(slot)
        if table is None:
            cfg = self.config
            table = level_table(cfg.levels, cfg.bits, cfg.mu, device, dtype)
            self._tables[slot] = table
        return table

    # -- quantile levels ------------------------------------------------------------------------

    def _quantile_levels(self, mags: Tensor, scales: Tensor, key: str | None) -> Tensor:
        """This call's fp32 levels for ``key``: refitted on schedule, else the stored ones."""
        if key is None:
            return self._fit(mags)
        calls = self._calls.get(key, 0)
        self._calls[key] = calls + 1
        old = self._levels.get(key)
        if old is not None:
            old = old.to(mags.device)
        if old is None or calls % self.config.refit_every == 0:
            fitted = self._fit(mags)
            if old is not None:
                # A non-finite step is skipped by GradScaler; do not let it move the levels.
                # (A device-side select: no host sync.)
                fitted = torch.where(torch.isfinite(scales).all(), fitted, old)
            old = fitted
            self._levels[key] = fitted
        return old.clone()

    def _fit(self, mags: Tensor) -> Tensor:
        """Levels at the ``j/(L-1)`` quantiles of (a sample of) ``mags``, first 0 and last 1."""
        cfg = self.config
        n = mags.numel()
        if n > cfg.sample:
            pick = torch.randint(
                n, (cfg.sample,), generator=self.generator(mags.device), device=mags.device
            )
            mags = mags[pick]
        # A sort, not torch.quantile: that refuses inputs beyond 16M elements.
        ordered = mags.sort().values
        m = ordered.numel()
        count = self.num_levels
        pos = [j * (m - 1) / (count - 1) for j in range(count)]
        below = [math.floor(p) for p in pos]
        above = [min(b + 1, m - 1) for b in below]
        frac = torch.tensor([p - b for p, b in zip(pos, below)], dtype=mags.dtype)
        dev = mags.device
        lo = ordered[torch.tensor(below, device=dev)]
        hi = ordered[torch.tensor(above, device=dev)]
        levels = (lo + frac.to(dev) * (hi - lo)).float().clamp_(0.0, 1.0)
        levels[0] = 0.0
        levels[-1] = 1.0
        return levels

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the per-key fitted levels and refit counters (``quantile``)."""
        state = super().state_dict()
        state["levels"] = {k: v.detach().clone() for k, v in self._levels.items()}
        state["calls"] = dict(self._calls)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._levels = {k: v.detach().clone().float() for k, v in state.get("levels", {}).items()}
        self._calls = {k: int(v) for k, v in state.get("calls", {}).items()}


class NonUniformKernels(FusedCodec):
    """Fixed level tables (log, mu-law), nearest level, 2/4/8 bits, in fused kernels: one
    statistics pass (each chunk's max |c|), one pass for symbols and residual."""

    op = "table"
    owner: NonUniform

    def enabled(self) -> bool:
        cfg = self.owner.config
        plain = cfg.levels != "quantile" and not (cfg.stochastic or cfg.entropy)
        return plain and cfg.bits in _NATIVE

    def table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The fp32 levels and their midpoints, as :func:`quantize_to_levels` computes them."""
        levels = self.owner._table(device, torch.float32)
        return levels, (levels[:-1] + levels[1:]) * 0.5

    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        cfg = self.owner.config
        st = ops.chunk_stats(g, e, cfg.chunk, minmax=True, host=not on_device())
        # c - decode(symbol) stays finite, so the residual needs no undo.
        if refuses(st.total, st.amax):
            return None
        assert st.lo is not None and st.hi is not None
        # max |c| per chunk, exactly; abs_ turns an all-zero chunk's -0 (max(0, -0)) into the
        # torch path's +0.
        scales = torch.maximum(st.hi, st.lo.neg()).abs_()
        levels, mids = self.table(g.device)
        return ops.table_encode(g, e, cfg.chunk, scales, mids, levels, cfg.bits), scales

    def sized(self, payload: Payload, n: int) -> bool:
        data, scales = payload
        cfg = self.owner.config
        return data.numel() == (n * cfg.bits + 7) // 8 and scales.numel() == -(-n // cfg.chunk)

    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        data, scales = payload
        levels, mids = self.table(data.device)
        cfg = self.owner.config
        return ops.table_decode(
            data, n, cfg.chunk, scales.contiguous(), mids, levels, cfg.bits, out
        )
