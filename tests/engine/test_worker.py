"""The communication worker: order, held futures, errors, re-entry."""

from __future__ import annotations

import threading

import pytest

from commhooks.engine import HELD, CommWorker


def test_jobs_run_in_submission_order_on_one_thread() -> None:
    worker = CommWorker()
    seen: list[tuple[int, str]] = []
    futs = [
        worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i)
        for i in range(50)
    ]
    assert [f.wait() for f in futs] == list(range(50))
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"commhooks-comm"}


def test_submit_returns_before_the_job_runs() -> None:
    worker = CommWorker()
    gate = threading.Event()
    first = worker.submit(lambda: gate.wait(10))
    second = worker.submit(lambda: 2)
    assert not first.done() and not second.done()
    gate.set()
    assert second.wait() == 2 and first.done()


def test_a_held_job_leaves_its_future_to_a_later_job() -> None:
    worker = CommWorker()
    held = worker.future()
    assert worker.submit(lambda: HELD, future=held) is held
    later = worker.submit(lambda: held.set_result("from later") or "later")
    assert later.wait() == "later"
    assert held.wait() == "from later"


def test_an_exception_reaches_the_waiter_and_the_worker_goes_on() -> None:
    worker = CommWorker()

    def boom() -> None:
        raise ValueError("field: why")

    with pytest.raises(ValueError, match="field: why"):
        worker.submit(boom).wait()
    assert worker.submit(lambda: 3).wait() == 3


def test_run_from_the_worker_itself_does_not_deadlock() -> None:
    worker = CommWorker()
    outer = worker.submit(lambda: worker.run(lambda: worker.on_worker()))
    assert outer.wait() is True
    assert worker.run(lambda: 5) == 5 and not worker.on_worker()


def test_drain_waits_for_every_queued_job() -> None:
    worker = CommWorker()
    done: list[int] = []
    gate = threading.Event()
    worker.submit(lambda: gate.wait(10))
    worker.submit(lambda: done.append(1))
    threading.Timer(0.2, gate.set).start()
    worker.drain()
    assert done == [1]


def test_a_job_raising_a_base_exception_fails_its_future_and_the_worker_lives() -> None:
    worker = CommWorker()

    def leave() -> None:
        raise SystemExit(3)

    with pytest.raises(RuntimeError, match="SystemExit"):
        worker.submit(leave).wait()
    assert worker.submit(lambda: 4).wait() == 4


def test_close_runs_the_queued_jobs_then_stops_and_a_later_submit_restarts() -> None:
    worker = CommWorker(name="commhooks-close-test")
    gate = threading.Event()
    first = worker.submit(lambda: gate.wait(10) and 1)
    second = worker.submit(lambda: 2)
    thread = worker._thread
    assert thread is not None
    threading.Timer(0.2, gate.set).start()
    worker.close()
    assert not thread.is_alive()
    assert first.wait() == 1 and second.wait() == 2
    assert worker.submit(lambda: 3).wait() == 3
    assert worker._thread is not None and worker._thread is not thread
    worker.close()


def test_the_exit_handler_stops_every_live_worker() -> None:
    from commhooks.engine import worker as module

    workers = [CommWorker(name=f"commhooks-exit-{i}") for i in range(2)]
    for w in workers:
        w.submit(lambda: None).wait()
    threads = [w._thread for w in workers]
    module._close_all()
    assert all(t is not None and not t.is_alive() for t in threads)
