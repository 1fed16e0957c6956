"""A task that hangs cannot stall a run on the cluster: the per-task deadline ends it."""
from __future__ import annotations

import time

from curate.engine import make_executor
from tests.conftest import make_config


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_hung_task_is_ended_and_the_rest_finish(tmp_path, record):
    cfg = make_config("unused", tmp_path, kind="local_cluster", retries=0, task_timeout_s=3)
    t0 = time.perf_counter()
    with make_executor(cfg) as ex:
        out = ex.map(sleepy, [0.1, 3600.0, 0.2, 0.3], label="hang")
    elapsed = time.perf_counter() - t0
    assert [o.ok for o in out] == [True, False, True, True]
    assert "KilledWorker" in out[1].error or "died" in out[1].error.lower(), out[1].error
    assert elapsed < 120
    record(f"hung task (1 h sleep) ended by a 3 s deadline in {elapsed:.0f} s", 1, 0, 0)
