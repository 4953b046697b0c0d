"""Per-step and cumulative communication stats: log lines, callbacks, TensorBoard.

Every closed step (:meth:`commhooks.engine.Step.close`) reaches its state's
``step_closed``, which

- logs one line every ``HookOptions.log_every`` steps (0: never), with the rank, the last
  step's ratio and bytes (so dense warm-up steps, ``start_iter``, do not hide what compression
  does now), the cumulative ratio and bytes, and the last step's compress / comm / decompress
  seconds. Rank 0 logs at INFO, the other ranks at DEBUG: set the ``commhooks`` logger to
  DEBUG to see every rank;
- calls the callbacks registered with :func:`add_stats_callback`, such as a
  :class:`TensorBoardLogger`.

Logging needs no set-up: when the first line is due and neither the ``commhooks`` logger nor
the root logger has a handler, a stderr handler is attached to ``commhooks`` (level INFO), as
transformers and accelerate do. Configure logging before the first step (e.g.
``logging.basicConfig``) and that handler is never added.

    state = commhooks.ddp.register(model, "topk:ratio=0.01", log_every=100)
    if dist.get_rank() == 0:
        TensorBoardLogger("runs/topk", every=10).attach(state)
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, Protocol

from commhooks.stats import CommStats, StatsCallback

__all__ = [
    "StatsCallback",
    "StatsSource",
    "TensorBoardLogger",
    "add_stats_callback",
    "ensure_handler",
    "feedback_norm",
    "log_step",
    "remove_stats_callback",
    "tensorboard_available",
]

logger = logging.getLogger(__name__)

_handler: logging.Handler | None = None


class StatsSource(Protocol):
    """What these helpers need of a state (:class:`commhooks.engine.CompressionState`)."""

    feedback: Any

    def add_stats_callback(self, fn: StatsCallback) -> None: ...

    def remove_stats_callback(self, fn: StatsCallback) -> None: ...


def ensure_handler() -> None:
    """Attach a stderr handler (level INFO) to the ``commhooks`` logger, once, if neither it
    nor the root logger has a handler; otherwise leave logging as the application set it."""
    global _handler
    package, root = logging.getLogger("commhooks"), logging.getLogger()
    if _handler is not None or package.handlers or root.handlers:
        return
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    package.addHandler(_handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def log_step(stats: CommStats, rank: int) -> None:
    """Log one line of ``stats``: INFO on rank 0, DEBUG on the other ranks.

    Args:
        stats: the state's stats after a step (``last_*``: that step; the rest: cumulative).
        rank: this process's rank, written first on the line.
    """
    ensure_handler()
    logger.log(
        logging.INFO if rank == 0 else logging.DEBUG,
        "rank %d step %d: last step ratio %.1fx (%d raw B, %d wire B, %.0f link B), "
        "compress %.4fs comm %.4fs decompress %.4fs; cumulative ratio %.1fx "
        "(%d raw B, %d wire B)",
        rank, stats.steps, stats.last_ratio, stats.last_raw_bytes, stats.last_wire_bytes,
        stats.last_link_bytes, stats.last_compress_s, stats.last_comm_s, stats.last_decompress_s,
        stats.ratio, stats.raw_bytes, stats.wire_bytes,
    )  # fmt: skip


def add_stats_callback(state: StatsSource, fn: StatsCallback) -> None:
    """Call ``fn(state, stats)`` after every step of ``state`` (``stats``: a copy).

    Args:
        state: a :class:`commhooks.ddp.CompressionState` (the callback goes with it).
        fn: the callback; keep it cheap, it runs inside the step (DDP's last bucket).
    """
    state.add_stats_callback(fn)


def remove_stats_callback(state: StatsSource, fn: StatsCallback) -> None:
    """Stop calling ``fn`` for ``state`` (ValueError if it was not added)."""
    state.remove_stats_callback(fn)


def feedback_norm(state: StatsSource) -> float | None:
    """The l2 norm over every error-feedback residual of ``state`` (None without error
    feedback). One read of the residual memory (the size of the compressed parameters)."""
    return state.feedback.norm() if state.feedback is not None else None


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed by torch's SummaryWriter) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLogger:
    """A stats callback that writes each step's scalars to a TensorBoard ``SummaryWriter``.

    Tags, under ``prefix`` (x axis: the state's step count):

    - ``ratio/last_step``, ``ratio/cumulative``: raw / wire bytes;
    - ``bytes/raw``, ``bytes/wire``, ``bytes/link``: the last step's bytes (link: the
      estimated bytes on this rank's link for the collective algorithms used);
    - ``time/compress_s``, ``time/comm_s``, ``time/decompress_s``: the last step's split;
    - ``feedback/norm``: the l2 norm of the error-feedback memory (with error feedback and
      ``feedback_norm=True``; a growing norm means compression drops more than it sends back).

    Attach it on rank 0 only (or give each rank its own directory). Use
    ``TensorBoardLogger(...).attach(state)`` or :func:`add_stats_callback`.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or a log directory to open one in
            (needs the ``tensorboard`` package; imported only then).
        every: write every this many steps (>= 1); 10-100 keeps event files small on long
            runs.
        prefix: the tag prefix.
        feedback_norm: write ``feedback/norm``; it reads every residual, about the cost of one
            optimizer step's memory traffic, so raise ``every`` on large models.
    """

    def __init__(
        self, writer: Any, every: int = 1, prefix: str = "commhooks", feedback_norm: bool = True
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: must be an int >= 1")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix={prefix!r}: must be a non-empty string")
        if isinstance(writer, str):
            if not tensorboard_available():
                raise ImportError(
                    "TensorBoardLogger(log_dir) needs the tensorboard package: "
                    "pip install tensorboard"
                )
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(writer)
        if not hasattr(writer, "add_scalar"):
            raise ValueError(f"writer={writer!r}: must be a SummaryWriter or a log directory")
        self.writer = writer
        self.every = every
        self.prefix = prefix
        self.feedback_norm = feedback_norm

    def attach(self, state: StatsSource) -> TensorBoardLogger:
        """Register this logger as a callback of ``state``; returns itself."""
        add_stats_callback(state, self)
        return self

    def __call__(self, state: StatsSource, stats: CommStats) -> None:
        if stats.steps % self.every:
            return
        step, p = stats.steps, self.prefix
        scalars = {
            "ratio/last_step": stats.last_ratio,
            "ratio/cumulative": stats.ratio,
            "bytes/raw": stats.last_raw_bytes,
            "bytes/wire": stats.last_wire_bytes,
            "bytes/link": stats.last_link_bytes,
            "time/compress_s": stats.last_compress_s,
            "time/comm_s": stats.last_comm_s,
            "time/decompress_s": stats.last_decompress_s,
        }
        if self.feedback_norm:
            norm = feedback_norm(state)
            if norm is not None:
                scalars["feedback/norm"] = norm
        for tag, value in scalars.items():
            self.writer.add_scalar(f"{p}/{tag}", value, step)

    def flush(self) -> None:
        """Write pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer."""
        self.writer.close()
