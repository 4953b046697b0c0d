"""The parent side: one shaped cluster (network namespaces, tc) per (ranks, link) or
(nodes, link), its torchrun commands, the interface counters read at each marker, and the
rows the ranks wrote. See ``e2e.py``."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any

from e2e_config import FAIL_GRACE_S, NONE, TORCH_PSGD, TORCH_PSGD_1B, Config, Row, TTARow
from e2e_measure import error_text

__all__ = ["ENTRY", "probe_torch_powersgd", "run_job", "run_nodes", "run_pair"]


#: the script each rank runs (``e2e.py --worker <job>``: :func:`e2e_measure.worker`)
ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e.py")


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
    script = [ENTRY, "--worker", job_path]
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
        why = f"crashed with DDP's default buckets: {error_text(e)}"
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
