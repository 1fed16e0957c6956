"""Per-sample time limit for decoders that may hang on a pathological input.

Python cannot interrupt a thread stuck in C code (a PIL decoder, zlib), so the work runs on a
helper thread and the caller waits at most ``seconds``. A helper that overruns is abandoned (it is
a daemon thread: it can never hold the process open) and a fresh one takes the next sample, so one
bad image costs one reason column, not a stalled shard. A helper that never returns keeps burning
its core; the per-task deadline (curate.engine.watchdog) is the backstop for that.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class SampleTimeout(Exception):
    """The call ran past its limit and was abandoned."""


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self.fn, self.args = fn, args
        # a bare lock, held until the job is done: half the cost of an Event (Condition + lock)
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


def _serve(jobs: "queue.SimpleQueue[_Job]") -> None:
    while True:
        job = jobs.get()
        try:
            job.result = job.fn(*job.args)
        except BaseException as e:  # handed back to the caller, re-raised there
            job.error = e
        job.done.release()


class TimeLimiter:
    """Runs calls one at a time on a helper thread, each with a time limit.

    One per stage object (so per worker process and thread of use); not shared across threads.
    ``seconds=None`` calls inline with no limit and no thread.
    """

    def __init__(self, seconds: float | None, name: str = "curate-decode"):
        self.seconds = seconds
        self.name = name
        self.abandoned = 0
        self._jobs: queue.SimpleQueue[_Job] | None = None
        self._pid = 0

    def _queue(self) -> "queue.SimpleQueue[_Job]":
        # A forked child (a DataLoader worker) inherits the queue but not the thread serving it.
        if self._jobs is None or self._pid != os.getpid():
            self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=_serve, args=(self._jobs,), daemon=True, name=self.name).start()
        return self._jobs

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.seconds is None:
            return fn(*args)
        job = _Job(fn, args)
        self._queue().put(job)
        if not job.done.acquire(timeout=self.seconds):
            self._jobs = None  # the helper is stuck on this job: the next call gets a new one
            self.abandoned += 1
            log.error("%s: a sample ran past %.1f s and was abandoned (%d so far in this process)",
                      self.name, self.seconds, self.abandoned)
            raise SampleTimeout(f"ran past {self.seconds} s")
        if job.error is not None:
            raise job.error
        return job.result

    def __getstate__(self) -> dict[str, Any]:  # stages are pickled to workers: threads are not
        return {"seconds": self.seconds, "name": self.name, "abandoned": 0, "_jobs": None, "_pid": 0}
