"""Fused CPU kernels for the quantizers, compiled from C on first use and called via ctypes.

The torch code in each compressor makes one pass over memory per op (add the residual, abs,
mean, compare, pack each bit plane, decode, subtract...), so a quantizer with error feedback
ran at 1-2% of memcpy speed. ``codecs.c`` does compensation, quantization, packing and the
new residual in two passes and decodes straight to fp32 (see docs/benchmarks.md for numbers).

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$COMMHOOKS_CACHE`` (default ``~/.cache/commhooks``), keyed by a hash of the source, the
flags, the compiler and the machine architecture. Ranks that start together build it once:
the build holds an exclusive lock on a file in that directory and renames the finished library
into place, so nobody loads half a file. On x86-64 the library holds the kernels compiled for
three levels (``-march=x86-64-v4``, ``-v3`` and the baseline) and each process binds the best
one its CPU runs, so a cache on a home directory shared across a cluster works on every node.
:func:`prepare` (or ``python -m commhooks.native build``) builds ahead of the first step.

Without a compiler, or when the build fails, :func:`lib` returns None, and every compressor
keeps its torch path (tested to give the same bytes), 10-50x slower: a RuntimeWarning and a
logged warning say so once per process. ``COMMHOOKS_NATIVE=0`` chooses the torch path
deliberately and is only logged at INFO.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from commhooks.coding.bitpack import packed_size, symbol_packing

try:
    import fcntl
except ImportError:  # not POSIX: builds still land atomically, but may be repeated
    fcntl = None  # type: ignore[assignment]

__all__ = ["Kernels", "build", "compiler", "enabled", "lib", "prepare", "signatures", "usable"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("codecs.c")
# -ffp-contract=off: no implicit fused multiply-adds, so float results match torch's op-by-op
# rounding (the one explicit fmaf mirrors torch.addcmul, which fuses where torch's kernels do).
# The two -fno-* let loops with float compares vectorize; neither changes a result.
_FLAGS = [
    "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-pthread",
]  # fmt: skip
# (suffix, flags) of each compiled copy, best first. The baseline copy also holds
# ch_cpu_level(), which picks among them at load time; codecs.c says why these levels.
_X86_LEVELS = [
    ("v4", ["-march=x86-64-v4"]), ("v3", ["-march=x86-64-v3"]), ("v1", ["-march=x86-64"]),
]  # fmt: skip
_LEVEL_OF = {4: "v4", 3: "v3", 1: "v1"}
# Below this many elements the ctypes call and the scratch allocation cost more than they save.
MIN_NUMEL = 1 << 14

_lock = threading.Lock()
_lib: Kernels | None = None
_tried = False
_why: str | None = None  # why the kernels are unavailable, once tried
_told_off = False

#: ctypes types of the C scalar types the kernels' signatures use; any pointer is a c_void_p
_C_TYPES: dict[str, type | None] = {
    "void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "uint32_t": ctypes.c_uint32,
    "float": ctypes.c_float, "double": ctypes.c_double,
}  # fmt: skip
# An exported kernel's definition in codecs.c: ``<type> CH(ch_<name>)(<parameters>) {``.
_EXPORTED = re.compile(r"^(\w+)\s+CH\((ch_\w+)\)\(([^)]*)\)\s*\{", re.MULTILINE)


def _ctype(decl: str) -> type | None:
    """The ctypes type of a C parameter or return type (``const float *g``, ``int64_t``)."""
    if "*" in decl:
        return ctypes.c_void_p
    words = [w for w in decl.split() if w != "const"]
    if not words or words[0] not in _C_TYPES:
        raise ValueError(f"codecs.c: no ctypes type for {decl!r}; add it to _C_TYPES")
    return _C_TYPES[words[0]]


def signatures(source: str | None = None) -> dict[str, tuple[type | None, list[type | None]]]:
    """``name -> (restype, argtypes)`` of every exported kernel, read from the definitions in
    ``codecs.c`` (``source``: its text), so the C source is the one declaration of each."""
    text = _SOURCE.read_text() if source is None else source
    table: dict[str, tuple[type | None, list[type | None]]] = {}
    for ret, name, params in _EXPORTED.findall(text):
        args = [p.strip() for p in params.split(",") if p.strip() and p.strip() != "void"]
        table[name] = (_ctype(ret), [_ctype(a) for a in args])
    return table


def enabled() -> bool:
    """Whether native kernels may be used (``COMMHOOKS_NATIVE=0`` turns them off)."""
    return os.environ.get("COMMHOOKS_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    root = os.environ.get("COMMHOOKS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "commhooks"


def _levels() -> list[tuple[str, list[str]]]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return _X86_LEVELS
    return [("v1", [])]


class Kernels:
    """The loaded library's functions for this CPU's level, by their unsuffixed names
    (``ch_sign_encode``...), with the library's ``path`` and the ``level`` bound: the best
    one the CPU runs, unless ``level`` names another (the tests compare them)."""

    def __init__(self, path: Path, level: str | None = None) -> None:
        handle = ctypes.CDLL(str(path))
        handle.ch_cpu_level.restype, handle.ch_cpu_level.argtypes = ctypes.c_int, []
        if level is None:
            level = _LEVEL_OF.get(int(handle.ch_cpu_level()), "v1")
            if not hasattr(handle, f"ch_sign_encode_{level}"):  # a compiler without that level
                level = "v1"
        self.path, self.level, self._handle = path, level, handle
        for name, (res, args) in signatures().items():
            fn = getattr(handle, f"{name}_{level}")
            fn.restype, fn.argtypes = res, args
            setattr(self, name, fn)


def _command(cc: str) -> list[str]:
    return shlex.split(cc)


def _key(cc: str) -> str:
    version = subprocess.run(
        [*_command(cc), "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    levels = " ".join(f"{name}:{' '.join(flags)}" for name, flags in _levels())
    parts = (_SOURCE.read_text(), " ".join(_FLAGS), levels, cc, version, platform.machine())
    return hashlib.sha256(b"\0".join(p.encode() for p in parts)).hexdigest()[:16]


def _compile(cc: str, out: str, work: str) -> None:
    """Compile every level's copy (at once) and link them into ``out``."""
    objects, procs = [], []
    for i, (name, flags) in enumerate(_levels()):
        obj = os.path.join(work, f"{name}.o")
        defs = [f"-DCH_LEVEL={name}"] + (["-DCH_PROBE"] if i == len(_levels()) - 1 else [])
        cmd = [*_command(cc), *_FLAGS, *flags, *defs, "-c", str(_SOURCE), "-o", obj]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        objects.append(obj)
    built = []
    for (name, flags), obj, p in zip(_levels(), objects, procs, strict=True):
        text = p.communicate(timeout=300)[0].decode(errors="replace").strip()[:2000]
        if not p.returncode:
            built.append(obj)
        elif name == "v1":
            raise RuntimeError(f"{cc} failed: {text}")
        else:  # an older compiler without this -march level: the others still serve
            logger.warning("native kernels: %s %s failed, level left out: %s", cc, flags, text)
    res = subprocess.run(
        [*_command(cc), "-shared", "-pthread", *built, "-o", out, "-lm"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"{cc} failed to link: {res.stderr.strip()[:2000]}")


def build(cc: str | None = None) -> Path:
    """The library's path in the cache, built there first unless it is there already; safe
    when many processes call it at once (one builds, the others wait for it and load its file).
    Raises RuntimeError (or OSError) when it cannot be built."""
    cc = cc or compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install one, or set CC)")
    try:
        target = _cache_dir() / f"codecs-{_key(cc)}.so"
    except OSError as e:
        raise RuntimeError(f"cannot run the C compiler {cc!r}: {e}") from e
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if target.exists():  # built by whoever held the lock before us
            return target
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
            tmp = os.path.join(work, target.name)
            _compile(cc, tmp, work)
            os.replace(tmp, target)
        logger.info("built native kernels %s in %.1fs", target, time.perf_counter() - start)
    return target


def compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc`` or ``gcc`` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def lib() -> Kernels | None:
    """The loaded kernels, built on first use; None if unavailable or disabled (the first
    such answer warns, see the module's docstring)."""
    global _lib, _tried, _why, _told_off
    if not enabled():
        if not _told_off:
            _told_off = True
            logger.info("COMMHOOKS_NATIVE=0: native kernels off, compressors use the torch path")
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = Kernels(build())
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            _lib, _why = None, str(e) or type(e).__name__
            msg = (
                f"commhooks: native kernels unavailable ({_why}); compressors fall back to "
                "their torch path, 10-50x slower. COMMHOOKS_NATIVE=0 chooses that quietly."
            )
            logger.warning("native kernels unavailable, using the torch path: %s", _why)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _tried = True
    return _lib


def prepare() -> bool:
    """Build and load the kernels now, rather than inside the first training step; whether
    they are available. Idempotent, and cheap once they are loaded (or found unavailable)."""
    return lib() is not None


def unavailable_reason() -> str | None:
    """Why :func:`lib` returned None (after it did), or None."""
    if not enabled():
        return "COMMHOOKS_NATIVE=0"
    return _why


def usable(*tensors: Tensor, numel: int | None = None) -> bool:
    """Whether the native kernels can take these tensors: on the CPU, contiguous, floating ones
    fp32, ``numel`` (default: the first tensor's) large enough to pay for the call, and the
    library loads."""
    if not tensors:
        return False
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            return False
        if t.is_floating_point() and t.dtype != torch.float32:
            return False
    size = tensors[0].numel() if numel is None else numel
    return size >= MIN_NUMEL and lib() is not None


def threads() -> int:
    return max(1, torch.get_num_threads())


def ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# -- the kernels, on tensors ------------------------------------------------------------------
# Callers check usable() first; these take fp32 contiguous CPU tensors and trust their shapes.


class Stats(NamedTuple):
    """Per-chunk statistics of ``c = g + e``."""

    sums: Tensor  # sum |c| (fp64); sum (c - pivot) when a pivot is given
    sumsq: Tensor | None  # sum c^2 (fp64), when asked for
    lo: Tensor | None  # min c (fp32), when asked for
    hi: Tensor | None  # max c
    # sum |c| (or c - pivot) over the tensor: non-finite iff some c is; a host float, or a
    # 0-d device tensor where the backend was asked not to read it back
    total: float | Tensor
    amax: float | Tensor  # max |c|


def chunk_stats(
    g: Tensor, e: Tensor | None, chunk: int, minmax: bool = False, squares: bool = False,
    pivot: float | None = None,
) -> Stats:  # fmt: skip
    """Per-chunk statistics of ``c = g + e`` (``e`` may be None) in one pass. With ``pivot``,
    ``sums`` and ``sumsq`` hold sums of ``d = c - pivot`` and ``d**2`` (signed; a pivot near
    the mean keeps a variance from them accurate)."""
    h = lib()
    assert h is not None
    n = g.numel()
    nchunks = -(-n // chunk)
    sums = torch.empty(nchunks, dtype=torch.float64)
    sq = torch.empty(nchunks, dtype=torch.float64) if squares else None
    lo = torch.empty(nchunks, dtype=torch.float32) if minmax else None
    hi = torch.empty(nchunks, dtype=torch.float32) if minmax else None
    scratch = torch.empty(int(h.ch_stats_items(n, chunk)), dtype=torch.float64)
    amax = ctypes.c_float()
    total = h.ch_chunk_stats(
        ptr(g), ptr(e), n, chunk, ptr(sums), ptr(sq), ptr(lo), ptr(hi), ctypes.addressof(amax),
        ptr(scratch), int(pivot is not None), 0.0 if pivot is None else pivot, threads(),
    )  # fmt: skip
    return Stats(sums, sq, lo, hi, float(total), float(amax.value))


def sign_encode(g: Tensor, e: Tensor | None, chunk: int, scale: Tensor) -> Tensor:
    """Sign bits of ``g + e`` packed as ``pack_bits(.., 1)``; updates ``e`` to the residual."""
    h = lib()
    assert h is not None
    n = g.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    h.ch_sign_encode(ptr(g), ptr(e), n, chunk, ptr(scale), ptr(bits), threads())
    return bits


def sign_decode(bits: Tensor, n: int, chunk: int, scale: Tensor, out: Tensor | None) -> Tensor:
    """``+-scale`` per element; added into ``out`` when given."""
    h = lib()
    assert h is not None
    acc = out is not None
    out = out if out is not None else torch.empty(n, dtype=torch.float32)
    h.ch_sign_decode(ptr(bits), n, chunk, ptr(scale), ptr(out), int(acc), threads())
    return out


def uniform_encode(
    g: Tensor, e: Tensor | None, chunk: int, lo: Tensor, step: Tensor, bits: int,
    seed: int | None = None,
) -> Tensor:  # fmt: skip
    """Min-max codes of ``g + e`` packed as ``pack_bits(.., bits)``; updates ``e``. Rounded
    to the nearest level, or stochastically with noise from ``seed`` when one is given."""
    h = lib()
    assert h is not None
    n = g.numel()
    data = torch.empty((n * bits + 7) // 8, dtype=torch.uint8)
    s = 0 if seed is None else seed
    h.ch_uniform_encode(
        ptr(g), ptr(e), n, chunk, ptr(lo), ptr(step), bits, ptr(data), int(seed is not None),
        s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF, threads(),
    )  # fmt: skip
    return data


def uniform_decode(
    data: Tensor, n: int, chunk: int, lo: Tensor, step: Tensor, bits: int, out: Tensor | None
) -> Tensor:
    """``code * step + lo`` per element; added into ``out`` when given."""
    h = lib()
    assert h is not None
    acc = out is not None
    out = out if out is not None else torch.empty(n, dtype=torch.float32)
    h.ch_uniform_decode(
        ptr(data), n, chunk, ptr(lo), ptr(step), bits, ptr(out), int(acc), threads()
    )
    return out


def _check_table(levels: Tensor, bits: int) -> None:
    # The kernels' local tables hold 128 levels, and every code must name a level.
    if bits not in (2, 4, 8) or 2 * levels.numel() != 1 << bits:
        raise ValueError(f"table kernels: {levels.numel()} levels for {bits}-bit codes")


def table_encode(
    g: Tensor, e: Tensor | None, chunk: int, scale: Tensor, mids: Tensor, levels: Tensor,
    bits: int,
) -> Tensor:  # fmt: skip
    """Symbols ``2 * level + sign`` of ``g + e`` against the sorted ``levels`` (0 to 1, times
    the per-chunk ``scale``; nearest by the fp32 ``mids``), packed as ``pack_bits(.., bits)``;
    updates ``e`` to the residual."""
    h = lib()
    assert h is not None
    _check_table(levels, bits)
    n = g.numel()
    data = torch.empty((n * bits + 7) // 8, dtype=torch.uint8)
    h.ch_table_encode(
        ptr(g), ptr(e), n, chunk, ptr(scale), ptr(mids), ptr(levels), levels.numel(), bits,
        ptr(data), threads(),
    )  # fmt: skip
    return data


def table_decode(
    data: Tensor, n: int, chunk: int, scale: Tensor, mids: Tensor, levels: Tensor, bits: int,
    out: Tensor | None,
) -> Tensor:  # fmt: skip
    """``+-levels[symbol >> 1] * scale`` per element; added into ``out`` when given."""
    h = lib()
    assert h is not None
    _check_table(levels, bits)
    acc = out is not None
    out = out if out is not None else torch.empty(n, dtype=torch.float32)
    h.ch_table_decode(
        ptr(data), n, chunk, ptr(scale), ptr(mids), ptr(levels), levels.numel(), bits, ptr(out),
        int(acc), threads(),
    )  # fmt: skip
    return out


def stochastic_encode(
    kind: int, g: Tensor, e: Tensor | None, chunk: int, norm: Tensor, levels: int,
    alphabet: int, packing: tuple[int, int], seed: int,
) -> Tensor:  # fmt: skip
    """Symbols (``kind`` 0: QSGD, 1: TernGrad, 2: :func:`grid_encode`'s grid) of ``g + e`` packed as
    ``pack_symbols(.., alphabet)``; updates ``e`` to the residual."""
    h = lib()
    assert h is not None
    n = g.numel()
    bits, radix = packing
    data = torch.empty(packed_size(n, packing), dtype=torch.uint8)
    h.ch_stoch_encode(
        kind, ptr(g), ptr(e), n, chunk, ptr(norm), levels, bits, radix, alphabet, ptr(data),
        seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, threads(),
    )  # fmt: skip
    return data


def stochastic_decode(
    data: Tensor, n: int, chunk: int, norm: Tensor, levels: int, alphabet: int,
    packing: tuple[int, int], out: Tensor | None, kind: int = 0,
) -> Tensor:  # fmt: skip
    """``(symbol - levels) * norm / levels`` per chunk (``kind`` 2: grid values, see
    :func:`grid_encode`); added into ``out`` when given."""
    h = lib()
    assert h is not None
    acc = out is not None
    out = out if out is not None else torch.empty(n, dtype=torch.float32)
    bits, radix = packing
    h.ch_stoch_decode(
        kind, ptr(data), n, chunk, ptr(norm), levels, bits, radix, alphabet, ptr(out), int(acc),
        threads(),
    )  # fmt: skip
    return out


def grid_encode(g: Tensor, e: Tensor | None, grid: Tensor, bits: int) -> Tensor:
    """Codes ``k`` of ``g + e`` on the ``2**bits`` levels ``mid + (2k - top) * half`` (``grid``
    = fp32 ``[mid, half]``, ``top = 2**bits - 1``), nearest, clamped, packed as
    ``pack_symbols(.., 2**bits)``; updates ``e`` to the residual. Decode with
    :func:`stochastic_decode` and ``kind=2``."""
    n = g.numel()
    top = (1 << bits) - 1
    return stochastic_encode(2, g, e, n, grid, top, top + 1, symbol_packing(top + 1), 0)


def select_at_least(g: Tensor, e: Tensor | None, threshold: float) -> tuple[Tensor, Tensor, bool]:
    """Positions (ascending int64) and values of ``c = g + e`` with ``!(|c| < threshold)``, in
    one pass that writes nothing to ``g`` or ``e``; and whether every collected ``c`` is finite
    (NaN is collected, as :func:`commhooks.compressors._sparse.select_at_least` collects it)."""
    h = lib()
    assert h is not None
    handle, finite = ctypes.c_void_p(), ctypes.c_int()
    count = h.ch_select(
        ptr(g), ptr(e), g.numel(), threshold, ctypes.byref(handle), ctypes.byref(finite),
        threads(),
    )  # fmt: skip
    idx = val = None
    try:
        if count < 0:
            raise MemoryError(f"native top-k selection: out of memory ({g.numel()} elements)")
        idx = torch.empty(count, dtype=torch.int64)
        val = torch.empty(count, dtype=torch.float32)
    finally:
        h.ch_select_take(handle, ptr(idx), ptr(val))
    return idx, val, bool(finite.value)


def casts(dtype: torch.dtype) -> bool:
    """Whether the cast kernels serve ``dtype`` (bf16 always; fp16 where the compiler has a
    half type or F16C)."""
    h = lib()
    if h is None or dtype not in (torch.float16, torch.bfloat16):
        return False
    return dtype == torch.bfloat16 or bool(h.ch_cast_fp16())


def cast_encode(g: Tensor, e: Tensor | None, scale: float, out: Tensor) -> bool:
    """``out = half((g + e) * scale)`` (``out``'s dtype, fp16 or bf16); writes nothing else.
    Returns whether every element of ``out`` is finite."""
    h = lib()
    assert h is not None
    bf16 = int(out.dtype == torch.bfloat16)
    return bool(h.ch_cast_encode(ptr(g), ptr(e), g.numel(), scale, bf16, ptr(out), threads()))


def cast_residual(g: Tensor, e: Tensor, scale: float, sent: Tensor, decay: float) -> None:
    """``e = ((g + e) - float(sent) / scale) * decay`` in place (``sent``: from
    :func:`cast_encode`)."""
    h = lib()
    assert h is not None
    bf16 = int(sent.dtype == torch.bfloat16)
    h.ch_cast_residual(ptr(g), ptr(e), g.numel(), scale, bf16, ptr(sent), decay, threads())


def cast_decode(
    half: Tensor, scale: float, out: Tensor | None = None, divisor: float = 1.0
) -> Tensor:
    """``float(half) / scale / divisor`` as fp32 (two divisions, as torch ops round them),
    into ``out`` when given."""
    h = lib()
    assert h is not None
    out = out if out is not None else torch.empty(half.numel(), dtype=torch.float32)
    bf16 = int(half.dtype == torch.bfloat16)
    h.ch_cast_decode(ptr(half), half.numel(), scale, divisor, bf16, ptr(out), threads())
    return out


#: the integer code widths the symmetric-code kernels read and write
_SYMM_CODES = (torch.int8, torch.int16, torch.int32)


def _symm_width(codes: Tensor) -> int:
    """Bytes per code; ValueError for a dtype the kernels would misread."""
    if codes.dtype not in _SYMM_CODES:
        raise ValueError(f"codes: {codes.dtype}; the kernels take int8, int16 or int32 codes")
    return codes.element_size()


def symm_absmax(g: Tensor, e: Tensor | None, chunk: int) -> Tensor:
    """Per-chunk ``max |g + e|`` (fp32), +inf for a chunk holding a NaN."""
    h = lib()
    assert h is not None
    n = g.numel()
    out = torch.empty(-(-n // chunk), dtype=torch.float32)
    h.ch_symm_absmax(ptr(g), ptr(e), n, chunk, ptr(out), threads())
    return out


def symm_encode(
    g: Tensor, e: Tensor | None, chunk: int, step: Tensor, level: int, codes: Tensor
) -> None:
    """``codes`` (int8/16/32) = ``clamp(round(c / step), -level, level)`` of ``c = g + e``, per
    chunk, NaN quotients as 0; writes nothing else."""
    width = _symm_width(codes)
    h = lib()
    assert h is not None
    h.ch_symm_encode(
        ptr(g), ptr(e), g.numel(), chunk, ptr(step), float(level), ptr(codes), width, threads(),
    )  # fmt: skip


def symm_residual(
    g: Tensor, e: Tensor, chunk: int, step: Tensor, codes: Tensor, decay: float
) -> None:
    """``e = ((g + e) - float(codes) * step) * decay`` in place (``codes``: from
    :func:`symm_encode` on these ``g`` and ``e``)."""
    width = _symm_width(codes)
    h = lib()
    assert h is not None
    h.ch_symm_residual(
        ptr(g), ptr(e), g.numel(), chunk, ptr(step), ptr(codes), width, decay, threads(),
    )  # fmt: skip


def symm_decode(codes: Tensor, chunk: int, step: Tensor, divisor: float, out: Tensor) -> None:
    """``out = (float(codes) * step) / divisor``, per chunk (two roundings, as torch's)."""
    width = _symm_width(codes)
    h = lib()
    assert h is not None
    h.ch_symm_decode(
        ptr(codes), width, codes.numel(), chunk, ptr(step), divisor, ptr(out), threads(),
    )  # fmt: skip


def indices_ok(*tensors: Tensor) -> bool:
    """Whether the index-code kernels take these tensors (contiguous, on the CPU). No size
    floor: the torch code they replace costs more than a ctypes call at any size."""
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    return lib() is not None


def varint_encode(idx: Tensor) -> Tensor:
    """LEB128 varints of the gaps between sorted int64 ``idx`` (the delta index code's body)."""
    h = lib()
    assert h is not None
    out = torch.empty(5 * idx.numel(), dtype=torch.uint8)
    size = h.ch_varint_encode(ptr(idx), idx.numel(), ptr(out))
    return out[:size].clone()


def varint_decode(body: Tensor) -> Tensor:
    """Inverse of :func:`varint_encode`; ValueError for a cut-off or overlong varint."""
    h = lib()
    assert h is not None
    idx = torch.empty(body.numel(), dtype=torch.int64)
    k = h.ch_varint_decode(ptr(body), body.numel(), ptr(idx))
    if k < 0:
        raise ValueError("index code: delta varint stream is truncated or overlong")
    return idx[:k].clone()
