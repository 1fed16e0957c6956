"""Samples done inside a running shard task, for the driver's progress line.

A task runs with a *sink* installed for its thread (``reporting``); the shard context counts the
samples a stage goes through with a ``Ticker``, which calls the sink at most once a second and
once at the end. The in-process engine's sink updates the progress line directly; the Dask
engine's sends the counts to the driver as worker events. Without a sink, counting costs nothing.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

# (stage id, shard, samples done, samples the stage will go through on the shard or None)
Sink = Callable[[str, str, int, "int | None"], None]

_local = threading.local()


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Install ``sink`` for the tasks this thread runs inside the block."""
    before = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = before


def current_sink() -> Sink | None:
    return getattr(_local, "sink", None)


class Ticker:
    """Counts one stage's samples on one shard and tells ``sink`` now and then (``every_s``)."""

    def __init__(self, sink: Sink | None, stage_id: str, shard: str, total: int | None, every_s: float = 1.0):
        self.sink, self.stage_id, self.shard, self.total, self.every_s = sink, stage_id, shard, total, every_s
        self.done = 0
        self.last = time.monotonic()

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.sink is None:
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.sink(self.stage_id, self.shard, self.done, self.total)

    def close(self) -> None:
        """The final count: the stage went through ``done`` samples of this shard."""
        if self.sink is not None:
            self.sink(self.stage_id, self.shard, self.done, self.done)
