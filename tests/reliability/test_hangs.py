"""Hangs cannot stall a run: a sample whose decoder never returns gets a reason (per-sample
limit), and a task that hangs is ended on the cluster (per-task deadline)."""
from __future__ import annotations

import pytest

import time

import polars as pl

from curate.engine import make_executor
from curate.runner.pipeline import run_pipeline
from tests.conftest import HANG_MAGIC, jpeg_bytes, make_config, make_pipeline, write_tar


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.slow
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


def test_hanging_decode_becomes_a_reason(tmp_path, record, hanging_format):
    members = []
    for i in range(6):
        img = HANG_MAGIC + b"\0" * 64 if i == 2 else jpeg_bytes((320, 240), (40 * i, 90, 200))
        members += [(f"{i:04d}.jpg", img), (f"{i:04d}.txt", f"a photo number {i} of a red bus".encode())]
    shard = write_tar(tmp_path / "hang.tar", members)
    pipe = make_pipeline(("image", {"decode_timeout_s": 1.0, "min_side": None, "measures": "all"}))
    t0 = time.perf_counter()
    s = run_pipeline(pipe, make_config(str(shard), tmp_path / "w"))
    elapsed = time.perf_counter() - t0
    assert s.ok
    t = pl.read_parquet(tmp_path / "w" / "image" / "hang.parquet")
    assert t.height == 6
    assert t["reason_image"].to_list() == [None, None, "image:decode_timeout", None, None, None]
    assert t["img_format"].null_count() == 1  # the five others were measured after the hang
    assert elapsed < 60
    record(f"image decoder hung forever on 1 of 6 samples: 1 s limit, run took {elapsed:.0f} s", 1, 0, 0)
