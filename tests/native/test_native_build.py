"""The kernel library as a dependency: built once however many ranks start together, for the
baseline CPU with faster levels picked at run time, threaded by a pool that two Python threads
can share, and loudly missed when it cannot be built."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import torch

from commhooks import native
from commhooks.coding.bitpack import symbol_packing

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.Popen[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen(
        [sys.executable, "-W", "always", "-c", code], env=full, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_ranks_starting_together_with_the_build_command_build_once(tmp_path):
    """``python -m commhooks.native build`` (a job's set-up step) and three processes loading
    the kernels start at once on one empty cache: the C compiler links the library once, the
    others wait on the lock and load the same file, no temporary is left behind, and ``info``
    then names that file."""
    cache, calls = tmp_path / "cache", tmp_path / "cc-calls"
    cc = tmp_path / "cc"  # the real compiler, each call logged, to count the builds
    real = native.compiler()
    assert real is not None, "the native kernels need a C compiler (make setup installs gcc)"
    cc.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(calls))}\nexec {real} "$@"\n')
    cc.chmod(0o755)
    env = {"COMMHOOKS_CACHE": str(cache), "CC": str(cc)}
    code = (
        "import os\n"
        "from commhooks import native\n"
        "k = native.lib()\n"
        "print(k.path, os.stat(k.path).st_ino)\n"
    )
    procs = [_python(code, **env) for _ in range(3)]
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    cli = [sys.executable, "-m", "commhooks.native"]
    procs.append(subprocess.Popen([*cli, "build"], env=full, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    links = [line for line in calls.read_text().splitlines() if "-shared" in line]
    assert len(links) == 1, links
    assert len({out for out, _ in outs[:3]}) == 1
    path = Path(outs[0][0].split()[0])
    assert path.parent == cache and outs[3][0].strip() == str(path)
    assert sorted(f.name for f in cache.iterdir()) == ["build.lock", path.name]
    info = subprocess.run([*cli, "info"], env=full, capture_output=True, text=True, timeout=120)
    assert info.stdout.startswith(str(path)), info.stdout + info.stderr


def test_no_build_flag_ties_the_library_to_this_cpu():
    flags = native._FLAGS + [f for _, level in native._levels() for f in level]
    assert not [f for f in flags if f.endswith("=native")]
    assert native._levels()[-1][0] == "v1"  # the baseline, which every CPU runs


def _outputs(k: native.Kernels, n: int) -> list[torch.Tensor]:
    """The encoders' payloads and residuals, and decodes, of one input through kernels k."""
    before = native._lib
    native._lib = k
    try:
        gen = torch.Generator().manual_seed(3)
        g = torch.randn(n, generator=gen)
        e = torch.randn(n, generator=gen) * 0.1
        out: list[torch.Tensor] = []
        stats = native.chunk_stats(g, e, 4096, minmax=True, squares=True)
        out += [stats.sums, stats.sumsq, stats.lo, stats.hi]
        scale = stats.sums.float() / 4096
        for enc in (
            lambda r: native.sign_encode(g, r, 4096, scale),
            lambda r: native.uniform_encode(g, r, 4096, stats.lo, (stats.hi - stats.lo) / 15, 4),
            lambda r: native.uniform_encode(g, r, 4096, stats.lo, (stats.hi - stats.lo) / 15, 4, 7),
            lambda r: native.stochastic_encode(
                0, g, r, 4096, torch.full((n // 4096 + 1,), 3.0), 4, 9, symbol_packing(9), 7
            ),
        ):
            r = e.clone()
            out += [enc(r), r]
        out.append(native.sign_decode(out[4], n, 4096, scale, None))
        idx, val, _ = native.select_at_least(g, e, 2.0)
        out += [idx, val]
        half = torch.empty(n, dtype=torch.float16)
        native.cast_encode(g, e, 1.0, half)
        out += [half.view(torch.int16), native.cast_decode(half, 1.0)]
        absmax = native.symm_absmax(g, e, 4096)
        step = absmax / 63
        codes = torch.empty(n, dtype=torch.int8)
        native.symm_encode(g, e, 4096, step, 63, codes)
        r = e.clone()
        native.symm_residual(g, r, 4096, step, codes, 0.9)
        mean = torch.empty(n)
        native.symm_decode(codes, 4096, step, 2.0, mean)
        out += [absmax, codes, r, mean]
        return out
    finally:
        native._lib = before


def test_every_cpu_level_gives_the_same_bytes():
    k = native.lib()
    assert k is not None
    levels = ["v1", "v3", "v4"][: {"v1": 1, "v3": 2, "v4": 3}[k.level]]
    ref = _outputs(native.Kernels(k.path, "v1"), 300_007)
    for level in levels[1:]:
        got = _outputs(native.Kernels(k.path, level), 300_007)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), level


def test_the_pool_gives_a_single_threads_bytes():
    k = native.lib()
    assert k is not None
    torch.set_num_threads(1)
    one = _outputs(k, 1_000_003)
    torch.set_num_threads(4)
    four = _outputs(k, 1_000_003)
    assert all(torch.equal(a, b) for a, b in zip(one, four, strict=True))


def test_two_python_threads_share_the_pool():
    """Calls from two threads at once (ctypes lets go of the GIL) each get their own result."""
    k = native.lib()
    assert k is not None
    ref = {n: _outputs(k, n) for n in (400_000, 700_001)}
    bad: list[str] = []

    def hammer(n: int) -> None:
        for _ in range(15):
            if not all(torch.equal(a, b) for a, b in zip(ref[n], _outputs(k, n), strict=True)):
                bad.append(f"{n} differs")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in ref]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and not bad


def test_a_forked_child_gets_a_pool_of_its_own():
    """The parent's workers do not exist in a fork()ed child (DataLoader workers are forked):
    its threaded calls must start a pool there rather than wait for them forever."""
    code = (
        "import os, sys, torch\n"
        "from commhooks import native\n"
        "torch.set_num_threads(4)\n"
        "g, e, s = torch.randn(1 << 20), torch.zeros(1 << 20), torch.ones(1)\n"
        "ref = bytes(native.sign_encode(g, e.clone(), 1 << 20, s).numpy())\n"
        "e2 = e.clone()\n"
        "pid = os.fork()\n"
        "if pid == 0:  # nothing but the kernel: torch's own thread pool is not fork-safe\n"
        "    out = bytes(native.sign_encode(g, e2, 1 << 20, s).numpy())\n"
        "    os._exit(0 if out == ref else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    p = _python(code)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err


def _torch_path_stderr(tmp_path: Path, **env: str) -> str:
    """stderr of a process (logging at INFO) that asks for the kernels three times, finds
    none, and compresses on the torch path."""
    code = (
        "import logging, torch, commhooks\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from commhooks import native\n"
        "assert native.lib() is None and native.lib() is None and not native.prepare()\n"
        "c = commhooks.compressor('sign')\n"
        "c.decompress(*c.compress(torch.randn(100_000)))\n"
    )
    p = _python(code, COMMHOOKS_CACHE=str(tmp_path), **env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return err


def test_a_failed_build_warns_once(tmp_path):
    err = _torch_path_stderr(tmp_path, CC="/nonexistent/cc")
    assert err.count("RuntimeWarning") == 1, err
    assert err.count("WARNING:commhooks.native") == 1, err
    assert "/nonexistent/cc" in err and "torch path" in err


def test_turning_the_kernels_off_is_only_logged(tmp_path):
    err = _torch_path_stderr(tmp_path, COMMHOOKS_NATIVE="0")
    assert "RuntimeWarning" not in err and "WARNING" not in err, err
    assert err.count("INFO:commhooks.native:COMMHOOKS_NATIVE=0") == 1, err
