"""commhooks.metrics: the per-step ratio, rank-0 log lines without set-up, stats callbacks and
TensorBoard event files, on real gloo processes."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any

import pytest
import torch
from _spawn import run_script

import commhooks.metrics as metrics
from commhooks.engine.state import CommStats, CompressionState

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("_metrics_worker.py")
STEPS, START_ITER = 6, 2  # as in _metrics_worker.py
LINE = re.compile(
    r"rank (\d) step (\d+): last step ratio ([0-9.]+)x .* cumulative ratio ([0-9.]+)x"
)


def _stderr(out: pathlib.Path, **env: str) -> str:
    """Run the worker on 2 ranks with torchrun's variables, from the fork server; return what
    the ranks logged."""
    return run_script(
        WORKER, 2, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, args=[str(out)], cwd=ROOT
    )[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: Any) -> tuple[pathlib.Path, str]:
    out = tmp_path_factory.mktemp("metrics")
    return out, _stderr(out)


def test_last_ratio_is_the_last_steps_own(run: Any) -> None:
    out, _ = run
    for r in range(2):
        steps = json.loads((out / f"rank{r}.json").read_text())
        assert [s["steps"] for s in steps] == list(range(1, STEPS + 1))
        for s in steps[:START_ITER]:  # dense warm-up
            assert s["last_ratio"] == 1.0
        for s in steps[START_ITER:]:
            assert s["last_ratio"] == s["last_raw_bytes"] / s["last_wire_bytes"]
            assert s["last_compress_s"] > 0 and s["last_comm_s"] > 0
            # The dense warm-up drags the cumulative ratio; the last step's is the real one.
            assert s["last_ratio"] > 10 and s["ratio"] < s["last_ratio"] / 2


def test_log_every_lines_appear_on_rank_0_without_setup(run: Any) -> None:
    _, stderr = run
    lines = [LINE.search(x) for x in stderr.splitlines() if "commhooks.metrics" in x]
    found = [(int(m[1]), int(m[2])) for m in lines if m]
    assert found == [(0, 2), (0, 4), (0, 6)], stderr[-3000:]
    last = [m for m in lines if m][-1]
    assert float(last[3]) > 10 and float(last[4]) < float(last[3])


def test_other_ranks_log_at_debug(tmp_path: pathlib.Path) -> None:
    stderr = _stderr(tmp_path, COMMHOOKS_DEBUG="1")
    found = {(int(m[1]), int(m[2])) for m in map(LINE.search, stderr.splitlines()) if m}
    assert found == {(r, s) for r in (0, 1) for s in (2, 4, 6)}, stderr[-3000:]


def test_tensorboard_event_file_has_every_scalar(run: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        f"commhooks/{t}"
        for t in ("ratio/last_step", "ratio/cumulative", "bytes/raw", "bytes/wire", "bytes/link",
                  "time/compress_s", "time/comm_s", "time/decompress_s", "feedback/norm")
    }  # fmt: skip
    assert tags == expected
    ratio = acc.Scalars("commhooks/ratio/last_step")
    assert [e.step for e in ratio] == list(range(1, STEPS + 1))
    assert [e.value for e in ratio[:START_ITER]] == [1.0, 1.0] and ratio[-1].value > 10
    norm = acc.Scalars("commhooks/feedback/norm")
    assert norm[0].value == 0.0 and norm[-1].value > 0  # residuals only once compressing


def _stats(steps: int) -> CommStats:
    return CommStats(raw_bytes=4000, wire_bytes=1000, steps=steps, last_raw_bytes=400,
                     last_wire_bytes=20, last_compress_s=0.5)  # fmt: skip


def test_log_step_levels_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="commhooks")
    metrics.log_step(_stats(7), rank=0)
    metrics.log_step(_stats(7), rank=3)
    (zero, three) = caplog.records
    assert (zero.levelno, three.levelno) == (logging.INFO, logging.DEBUG)
    assert zero.getMessage().startswith("rank 0 step 7: last step ratio 20.0x (400 raw B, 20 ")
    assert "compress 0.5000s" in zero.getMessage() and "cumulative ratio 4.0x" in zero.getMessage()
    assert three.getMessage().startswith("rank 3 step 7:")
    # Root has pytest's handler: no default handler is added.
    assert not logging.getLogger("commhooks").handlers


def test_callbacks_run_after_each_step_and_can_be_removed() -> None:
    state = CompressionState("topk:ratio=0.1")
    seen: list[int] = []

    def note(st: CompressionState, s: CommStats) -> None:
        seen.append(s.steps)

    metrics.add_stats_callback(state, note)
    state.begin().close()
    state.begin().close()
    metrics.remove_stats_callback(state, note)
    state.begin().close()
    assert seen == [1, 2]
    with pytest.raises(ValueError, match=r"^fn="):
        metrics.remove_stats_callback(state, note)
    with pytest.raises(ValueError, match=r"^fn="):
        metrics.add_stats_callback(state, 3)  # type: ignore[arg-type]


def test_tensorboard_logger_checks_its_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"^every=0"):
        metrics.TensorBoardLogger(str(tmp_path), every=0)
    with pytest.raises(ValueError, match=r"^writer="):
        metrics.TensorBoardLogger(object())
    with pytest.raises(ValueError, match=r"^prefix="):
        metrics.TensorBoardLogger(str(tmp_path), prefix="")


def test_feedback_norm_reads_the_residuals() -> None:
    assert metrics.feedback_norm(CompressionState("topk:ratio=0.5", error_feedback=False)) is None
    state = CompressionState("topk:ratio=0.5")
    assert metrics.feedback_norm(state) == 0.0
    assert state.feedback is not None
    g = torch.tensor([4.0, 3.0, 1.0, 2.0])
    state.feedback.compress(state.key_of(g), g)  # sends 4 and 3, keeps 1 and 2
    assert metrics.feedback_norm(state) == pytest.approx(5**0.5)
