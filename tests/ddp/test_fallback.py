"""``HookOptions(fallback="auto")``: the measured per-bucket fall-back to a dense all-reduce."""

from __future__ import annotations

import io

import pytest
import torch
from _workers import fallback_run

from commhooks.comm.collectives import Collectives, ReduceOp
from commhooks.ddp import HookOptions
from commhooks.engine.fallback import COMPRESSED, DENSE, Fallback


class _OneRank(Collectives):
    """A world of one (sums are the identity): enough to drive the probe schedule alone."""

    world, rank = 1, 0

    def all_reduce(self, buf: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> None:
        return None

    def all_gather(self, own: torch.Tensor) -> torch.Tensor:
        return own.clone()

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return send.clone()


@pytest.mark.parametrize(
    ("compressed", "dense", "choice"), [(5.0, 1.0, DENSE), (1.0, 5.0, COMPRESSED)]
)
def test_probe_schedule_then_the_faster_path(compressed, dense, choice):
    fb, comm, key = Fallback(probes=3), _OneRank(), ("a", "b")
    seen = []
    for _ in range(6):
        path, probe = fb.plan(key, comm, torch.device("cpu"))
        assert probe
        seen.append(path)
        # one disturbed call per path: the median ignores it
        slow = len(seen) <= 2
        fb.record(
            key, path, (100.0 if slow else 1.0) * (compressed if path == COMPRESSED else dense)
        )
    assert seen == [COMPRESSED, DENSE] * 3  # alternating, compressed first
    assert fb.plan(key, comm, torch.device("cpu")) == (choice, False)
    assert fb.plan(key, comm, torch.device("cpu")) == (choice, False)  # settled for good
    (b,) = fb.report()
    assert (b.compressed_ms, b.dense_ms) == (compressed * 1e3, dense * 1e3)
    # A resumed job keeps the settled path instead of probing again.
    resumed = Fallback(probes=3)
    resumed.load_state_dict(torch.load(_saved(fb), weights_only=False))
    assert resumed.plan(key, comm, torch.device("cpu")) == (choice, False)
    assert resumed.report() == fb.report()


def _saved(fb: Fallback) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(fb.state_dict(), buf)
    buf.seek(0)
    return buf


def test_options_are_checked():
    with pytest.raises(ValueError, match="fallback"):
        HookOptions(fallback="always")
    with pytest.raises(ValueError, match="fallback_probes"):
        HookOptions(fallback="auto", fallback_probes=0)
    assert HookOptions().fallback == "off"


def test_ranks_settle_alike_and_dense_buckets_flush_error_feedback(run_ranks):
    """On loopback a slow codec (non-uniform 4-bit quantiles) loses to a dense all-reduce: the
    buckets go dense on both ranks, together, with the same numbers; their residuals are sent
    and dropped; the replicas stay identical; later steps carry dense bytes."""
    steps = 12
    out = run_ranks(fallback_run, 2, "nonuniform:bits=4", steps)
    assert out[0]["report"] == out[1]["report"]
    assert out[0]["params"] == out[1]["params"]
    settled = [r for r in out[0]["report"] if r[1] is not None]
    assert settled, out[0]["report"]
    for _, choice, c_ms, d_ms, nc, nd in settled:
        assert (nc, nd) == (2, 2)
        assert choice == (DENSE if c_ms > d_ms else COMPRESSED)
    dense = {p for params, choice, *_ in settled if choice == DENSE for p in params}
    assert dense, "nonuniform beat a loopback all-reduce"
    assert not dense & set(out[0]["residual_keys"])  # flushed with the first dense step
    if len(dense) == sum(len(r[0]) for r in settled):
        assert out[0]["wire"][-1] == out[0]["raw"]  # every bucket dense: fp32 bytes
