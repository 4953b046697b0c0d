"""The communication worker: one thread per engine that runs every exchange, in order.

Compressed collectives are safe only if every rank issues the same collectives in the same
order. Front ends hand their groups of tensors over as soon as they are ready (DDP in bucket
order, from its autograd thread), and this worker runs them one at a time, first in first
out, while backward carries on. No collective is ever issued from a future's callback, which
is how torch's own PowerSGD hook lets ranks interleave buckets differently and crashes gloo.
Horovod's background thread follows the same rule.

On CUDA, a job starts on the worker's own stream after an event recorded on the submitting
thread's stream, so it sees the finished gradients without stalling the compute stream; its
future records the worker stream's work, and whoever waits on it (DDP's reducer) orders its
stream after it.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.futures import Future

__all__ = ["HELD", "CommWorker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "Future[Any]", Any, torch.device]

#: a job returns this to leave its future pending: it completes the future later itself
#: (a coalesced DDP bucket held for the step's last one)
HELD: Any = object()

# Workers with a running thread, stopped at interpreter exit (see :meth:`CommWorker.close`).
_LIVE: weakref.WeakSet[CommWorker] = weakref.WeakSet()


class CommWorker:
    """Runs submitted jobs on one daemon thread, in submission order.

    Args:
        name: the thread's name (shows in stack dumps and profilers).
    """

    def __init__(self, name: str = "commhooks-comm") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._streams: dict[torch.device, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def future(device: torch.device | None = None) -> Future[Any]:
        """A new future for a job's result; on CUDA it orders its waiters' streams after the
        worker stream's work."""
        cuda = device is not None and device.type == "cuda"
        return Future(devices=[device]) if cuda else Future()

    def submit(
        self,
        fn: Callable[[], T],
        device: torch.device | None = None,
        future: Future[T] | None = None,
    ) -> Future[T]:
        """Queue ``fn`` and return a future of its result (or of the exception it raised).

        Args:
            fn: the job; it runs on the worker thread after every job submitted before it.
                If it returns :data:`HELD`, the future is left for it to complete later.
            device: the device of the job's tensors. On CUDA the job waits, on the worker's
                stream, for the work queued so far on the caller's current stream.
            future: the future to complete (default: a new one from :meth:`future`).
        """
        cuda = device is not None and device.type == "cuda"
        fut = future if future is not None else self.future(device)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        job = (fn, fut, event, device if device is not None else torch.device("cpu"))
        with self._lock:
            self._start()
            self._jobs.put(job)
        return fut

    def run(self, fn: Callable[[], T], device: torch.device | None = None) -> T:
        """Run ``fn`` after every queued job and return its result: on the calling thread if
        it is the worker itself, else on the worker, waiting for it."""
        if self.on_worker():
            return fn()
        return self.submit(fn, device).wait()

    def drain(self) -> None:
        """Wait until every job submitted so far has run."""
        if self._thread is not None and not self.on_worker():
            self.submit(lambda: None).wait()

    def on_worker(self) -> bool:
        """Whether the caller is this worker's thread."""
        return threading.current_thread() is self._thread

    def close(self, timeout: float = 30.0) -> None:
        """Run the jobs queued so far, then stop the thread (a later submit starts a new one).

        Called for every live worker at interpreter exit: a daemon thread still inside a
        future's C++ completion when the interpreter finalizes is killed by a forced unwind
        through code that may not unwind, which aborts the process after training finished.

        Args:
            timeout: seconds to wait for the queued jobs before leaving the thread behind.
        """
        with self._lock:
            thread, jobs = self._thread, self._jobs
            if thread is None or thread is threading.current_thread():
                return
            # A later submit starts a thread on a queue of its own.
            self._thread, self._jobs = None, queue.SimpleQueue()
            jobs.put(None)  # the stop mark, after every job queued so far
        thread.join(timeout)

    def _start(self) -> None:
        """Start the thread if none runs; the caller holds the lock."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, args=(self._jobs,), name=self._name, daemon=True
            )
            self._thread.start()
            _LIVE.add(self)

    def _loop(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, fut, event, device = job
            try:
                if event is not None:
                    stream = self._streams.get(device)
                    if stream is None:
                        stream = self._streams[device] = torch.cuda.Stream(device)
                    with torch.cuda.device(device), torch.cuda.stream(stream):
                        stream.wait_event(event)
                        value = fn()
                        if value is not HELD:
                            fut.set_result(value)
                else:
                    value = fn()
                    if value is not HELD:
                        fut.set_result(value)
            except BaseException as e:  # handed to whoever waits on the job
                logger.debug("commhooks: job failed on %s: %r", self._name, e)
                # A torch future takes only Exceptions; the worker must outlive any job.
                fut.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))


@atexit.register
def _close_all() -> None:
    # A short wait: enough for a job that is finishing, not for one stuck on a dead peer.
    for worker in list(_LIVE):
        worker.close(timeout=5.0)
