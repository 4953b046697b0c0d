"""The measurement, one process per rank under torchrun in its namespace: step times and
wire bytes per variant (with interface-counter windows the parent reads), and time to
accuracy. ``e2e.py --worker <job.json>`` runs :func:`worker`. See ``e2e.py``."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from ddp_step import _max_over_ranks, _mean_over_ranks, mlp
from e2e_config import MARK_TIMEOUT_S, TORCH_PSGD, TORCH_PSGD_1B, Config, Row, TTARow
from e2e_variants import Loss, Variant, build_model, make_batches, our_powersgd_rank
from torch import Tensor, nn

__all__ = ["Marks", "error_text", "measure_model", "time_to_accuracy", "worker"]


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


def error_text(e: BaseException) -> str:
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
            row.error = error_text(e)
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
                row.error = error_text(e)
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
