"""Per-task deadline on a Dask worker: a hung task (a pathological sample, a stuck read) cannot
stall a run. Python cannot interrupt a thread stuck in C code, so past the deadline the worker
process ends itself; its nanny starts a fresh one and the scheduler retries the task elsewhere,
and after `distributed.scheduler.allowed-failures` such deaths the task is reported as failed."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)
EXIT_CODE = 75


def run_with_deadline(fn: Callable[[Any], Any], seconds: float, item: Any) -> Any:
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            log.error("task on %s ran past %.0f s: ending this worker so it is retried elsewhere", item, seconds)
            logging.shutdown()
            os._exit(EXIT_CODE)

    threading.Thread(target=watch, daemon=True, name="curate-deadline").start()
    try:
        return fn(item)
    finally:
        done.set()
