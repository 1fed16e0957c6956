from __future__ import annotations

import threading
import time

import pytest

from curate.core.background import in_background


def test_yields_all_items_in_order():
    assert list(in_background(iter(range(100)), depth=3)) == list(range(100))


def test_producer_error_reaches_consumer_after_earlier_items():
    def items():
        yield 1
        yield 2
        raise ValueError("broken batch")

    got = []
    with pytest.raises(ValueError, match="broken batch"):
        for x in in_background(items()):
            got.append(x)
    assert got == [1, 2]


def test_runs_ahead_by_depth_and_stops_when_consumer_leaves():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = in_background(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    assert 2 <= len(produced) <= 4  # one handed out, `depth` queued, one waiting to be queued
    it.close()
    time.sleep(0.3)
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n < 1000
    assert not [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]
