"""local_cuda_cluster: one worker per GPU, each pinned with CUDA_VISIBLE_DEVICES, plus CPU workers.
Runs on a machine without GPUs: the pinning is an environment variable and the scheduling is Dask's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from curate.core.config import ConfigError
from curate.engine import make_executor
from tests.conftest import make_config


def _visible(_: int) -> str:
    import time

    time.sleep(0.2)  # long enough that both GPU workers take a task
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


@pytest.mark.slow
def test_each_gpu_task_runs_on_a_worker_pinned_to_one_gpu(tmp_path: Path):
    cfg = make_config("x", tmp_path, kind="local_cuda_cluster", gpus=[3, 5], n_workers=1)
    with make_executor(cfg) as ex:
        gpu = ex.map(_visible, list(range(8)), label="gpu", resources={"GPU": 1})
        cpu = ex.map(_visible, list(range(4)), label="cpu")
    assert all(o.ok for o in gpu + cpu)
    assert {o.value for o in gpu} == {"3", "5"}  # GPU tasks only on the pinned GPU workers
    assert {o.value for o in cpu} <= {"3", "5", ""}


def test_no_gpu_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("curate.engine.dask._has_cuda", lambda: 0)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        make_executor(make_config("x", tmp_path, kind="local_cuda_cluster"))
