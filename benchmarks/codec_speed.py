"""Kernel speed of every compressor against memory bandwidth (``make bench-kernels``).

Usage: ``python benchmarks/codec_speed.py [--sizes 4M,16M,64M] [--reps 5] [--device cpu|cuda]
[--specs "topk;sign"] [--out F.json] [--markdown F.md] [--smoke]``

For each size (fp32 elements) and compressor, with and without error feedback, it times
compress and decompress separately and reports

    eta = fp32 bytes / (compress + decompress time)  /  memcpy rate measured in the same run,

i.e. how many memory copies of the gradient the codec costs (eta = 1: as fast as one copy).
With error feedback, "compress" includes adding the residual and storing the new one (which
needs this rank's own decoded payload). Repetitions are interleaved: each round times a copy,
then every variant once, so machine noise spreads over all; min / median / max over rounds.

It also compares top-k *selection* (commhooks' sampled-threshold top-k) with
``torch.topk(sorted=False)`` at 0.1% and 1%: the time ratio, and the L2 energy kept relative
to exact top-k's. CUDA runs too with ``--device cuda`` (synchronised timings; the quantizers
on the Triton kernels, see docs/gpu.md); ``make gpu-check`` runs it at 25M and 100M.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from _report import write

import commhooks
from commhooks.kernels import backend_for

SPECS = [
    "topk:ratio=0.01",
    "randomk:ratio=0.01",
    "threshold:threshold=2.5",  # keeps ~1.2% of N(0,1); its default 1e-3 keeps nearly all
    "dgc:ratio=0.01",
    "uniform:bits=8",
    "uniform:bits=4",
    "uniform:bits=8,stochastic=true",
    "uniform:bits=4,stochastic=true",
    "qsgd",
    "nonuniform:bits=4",
    "ternary",
    "sign",
    "adaptive",
    "powersgd:rank=1",
    "powersgd:rank=4",
    "fp16",
    "bf16",
]
SMOKE_SPECS = ["topk:ratio=0.01", "sign", "uniform:bits=8", "powersgd:rank=2"]
TOPK_RATIOS = (0.001, 0.01)


@dataclass
class Row:
    """One (size, compressor, EF) variant's timings over the interleaved rounds."""

    numel: int
    spec: str
    error_feedback: bool
    compress_s: list[float] = field(default_factory=list)
    decompress_s: list[float] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        c, d, e = self.compress_s, self.decompress_s, self.eta
        total = [a + b for a, b in zip(c, d)]
        return {
            "compress_ms": 1e3 * statistics.median(c),
            "decompress_ms": 1e3 * statistics.median(d),
            # the unit on GPUs: compress + decompress, scaled to 100M parameters
            "ms_per_100m": 1e3 * statistics.median(total) * 1e8 / self.numel,
            "eta_min": min(e),
            "eta_median": statistics.median(e),
            "eta_max": max(e),
        }


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], tuple[float, object]]:
    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out

    return timed


def codecs(numel: int, specs: list[str], reps: int, device: torch.device) -> list[Row]:
    """Interleaved compress / decompress timings of every spec, with and without EF."""
    timed = _timer(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(numel, generator=g, device=device)
    # PowerSGD compresses matrices; every compressor sees the same 4096-column view.
    x2 = x.view(-1, 4096) if numel % 4096 == 0 else x
    dst = torch.empty_like(x)
    variants = []
    for spec in specs:
        for ef in (False, True):
            c = commhooks.compressor(spec)
            feedback = commhooks.ErrorFeedback(c) if ef else None

            def comp(c=c, feedback=feedback):  # type: ignore[no-untyped-def]
                return feedback.compress("w", x2) if feedback else c.compress(x2, "w")

            variants.append((Row(numel, spec, ef), comp, c))
    dst.copy_(x)  # first touch of dst's pages must not count as the copy's time
    for _, comp, c in variants:  # warm-up: allocations and lazy state
        c.decompress(*comp())
    for _ in range(reps):
        copy_s, _ = timed(lambda: dst.copy_(x))
        for row, comp, c in variants:
            tc, (payload, ctx) = timed(comp)
            td, _ = timed(lambda c=c, payload=payload, ctx=ctx: c.decompress(payload, ctx))
            row.compress_s.append(tc)
            row.decompress_s.append(td)
            row.eta.append(copy_s / (tc + td))
    return [row for row, _, _ in variants]


def topk_selection(numel: int, reps: int, device: torch.device) -> list[dict[str, float]]:
    """commhooks' top-k against ``torch.topk(sorted=False)``: time ratio and kept energy."""
    timed = _timer(device)
    x = torch.randn(numel, generator=torch.Generator(device=device).manual_seed(1), device=device)
    out = []
    for ratio in TOPK_RATIOS:
        k = max(1, int(ratio * numel))
        ours = commhooks.compressor(f"topk:ratio={ratio}")
        ours.decompress(*ours.compress(x, "w"))
        speedup = []
        for _ in range(reps):
            t_ref, _ = timed(lambda k=k: torch.topk(x.abs(), k, sorted=False))
            t_ours, (payload, ctx) = timed(lambda ours=ours: ours.compress(x, "w"))
            speedup.append(t_ref / t_ours)
        kept = ours.decompress(payload, ctx)
        # Against exact top-k of as many elements as ours kept (its count rounds up).
        exact = torch.topk(x.abs(), int((kept != 0).sum()), sorted=False).values
        energy = float(kept.double().square().sum() / exact.double().square().sum())
        out.append({
            "numel": numel, "ratio": ratio, "speedup_min": min(speedup),
            "speedup_median": statistics.median(speedup), "speedup_max": max(speedup),
            "energy": energy,
        })  # fmt: skip
    return out


def markdown(rows: list[Row], topk: list[dict[str, float]], meta: dict[str, object]) -> str:
    lines = [
        f"Device {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['reps']} interleaved rounds, kernels {meta['kernels']}; eta = copy time / "
        "(compress + decompress); ms/100M = compress + decompress per 100M parameters.",
        "",
        "| numel | compressor | EF | compress ms | decompress ms | ms/100M | eta min "
        "| eta median | eta max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.summary()
        lines.append(
            f"| {r.numel / 2**20:g}M | `{r.spec}` | {'on' if r.error_feedback else 'off'} | "
            f"{s['compress_ms']:.1f} | {s['decompress_ms']:.1f} | {s['ms_per_100m']:.2f} | "
            f"{s['eta_min']:.3f} | "
            f"{s['eta_median']:.3f} | {s['eta_max']:.3f} |"
        )
    lines += [
        "",
        "| numel | top-k ratio | speed-up vs torch.topk(sorted=False) min / median / max "
        "| L2 energy vs exact top-k |",
        "|---|---|---|---|",
    ]
    for t in topk:
        lines.append(
            f"| {t['numel'] / 2**20:g}M | {t['ratio']:g} | {t['speedup_min']:.2f} / "
            f"{t['speedup_median']:.2f} / {t['speedup_max']:.2f} | {t['energy']:.4f} |"
        )
    return "\n".join(lines)


def _kernels(device: torch.device) -> str:
    """Which kernel backend serves the quantizers on ``device`` (commhooks.kernels)."""
    backend = backend_for(torch.zeros(1 << 20, device=device), op="uniform")
    return backend.name if backend is not None else "none (torch path)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4M,16M,64M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--specs", default="", help="';'-separated specs (default: all)")
    ap.add_argument("--out", default="", help="also write JSON here")
    ap.add_argument("--markdown", default="", help="also write the tables here")
    ap.add_argument("--smoke", action="store_true", help="one small size, 4 specs, 1 round")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device here")
    specs = [s for s in args.specs.split(";") if s] or (SMOKE_SPECS if args.smoke else SPECS)
    sizes = [2**16] if args.smoke else [_parse_size(s) for s in args.sizes.split(",")]
    reps = 1 if args.smoke else args.reps
    rows, topk = [], []
    for n in sizes:
        rows += codecs(n, specs, reps, device)
        topk += topk_selection(n, reps, device)
        print(f"# {n / 2**20:g}M done", file=sys.stderr)
    meta = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "reps": reps, "sizes": sizes, "kernels": _kernels(device),
    }  # fmt: skip
    md = markdown(rows, topk, meta)
    data = {**meta, "rows": [asdict(r) | r.summary() for r in rows], "topk": topk}
    write(md, data, args.markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
