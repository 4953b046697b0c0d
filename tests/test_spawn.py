"""The rank runner behind ``run_ranks`` (tests/_spawn.py): a failing rank fails the test with
its traceback, a hung one fails it at the deadline, and ranks started from the fork server see
the environment of the moment they start. ``run_script`` (the docs' snippets) runs a file as
``__main__`` on ranks that find their group as under torchrun, and fails on its failure."""

from __future__ import annotations

import os
import time

import pytest
import torch
from _spawn import run_script


def _rank_1_raises(rank: int, world: int, store: str, out: str) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    torch.save(rank, out)


def _hangs(rank: int, world: int, store: str, out: str) -> None:
    time.sleep(3600)


def _reads_env(rank: int, world: int, store: str, out: str) -> None:
    torch.save((os.environ.get("COMMHOOKS_SPAWN_TEST"), os.getpid()), out)


def test_a_failing_rank_fails_the_test_with_its_traceback(run_ranks) -> None:
    with pytest.raises(Exception, match="rank 1 fails on purpose") as info:
        run_ranks(_rank_1_raises, 2)
    assert "Traceback" in str(info.value) and "_rank_1_raises" in str(info.value)


def test_a_hung_rank_fails_at_the_deadline(run_ranks) -> None:
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="_hangs on 2 ranks still running after 2"):
        run_ranks(_hangs, 2, deadline=2)
    assert time.monotonic() - t0 < 60


def test_ranks_see_the_environment_and_are_fresh_processes(run_ranks, monkeypatch) -> None:
    run_ranks(_reads_env, 2)  # the fork server is running before the variable is set
    monkeypatch.setenv("COMMHOOKS_SPAWN_TEST", "set in the test")
    first = run_ranks(_reads_env, 2)
    second = run_ranks(_reads_env, 2)
    assert [v for v, _ in first] == ["set in the test"] * 2
    pids = {p for _, p in first + second}
    assert len(pids) == 4 and os.getpid() not in pids


TORCHRUN_SCRIPT = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(f"rank{os.environ['LOCAL_RANK']}.txt", "w") as f:
    f.write(f"{__name__} {sys.argv[0]} {dist.get_world_size()} {t.item()}")
dist.destroy_process_group()
"""


def test_a_script_runs_on_ranks_with_torchruns_variables(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    run_script(script, 2, env=dict(os.environ))
    for r in range(2):
        assert (tmp_path / f"rank{r}.txt").read_text() == f"__main__ {script} 2 3.0"


@pytest.mark.parametrize(
    ("body", "message"),
    [("raise ValueError('the script fails')", "the script fails"),
     ("import sys; sys.exit(3)", "exit code 3")],
)  # fmt: skip
def test_a_failing_script_fails_the_test(tmp_path, body: str, message: str) -> None:
    script = tmp_path / "job.py"
    script.write_text(body + "\n")
    with pytest.raises(Exception, match=message):
        run_script(script, env=dict(os.environ))
