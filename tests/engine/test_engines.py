"""The same tables from the in-process engine, an embedded LocalCluster and a real cluster."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.runner.pipeline import run_pipeline
from curate.report.stats import funnel
from tests.conftest import ROOT, make_config, make_pipeline, tables_equal_dir

BIN = Path(sys.executable).parent


def test_local_cluster_matches_inprocess(pool: Path, tmp_path: Path):
    inp = str(pool / "*.tar")
    a = run_pipeline(make_pipeline("index"), make_config(inp, tmp_path / "a"))
    b = run_pipeline(make_pipeline("index"), make_config(inp, tmp_path / "b", kind="local_cluster"))
    assert a.ok and b.ok
    tables_equal_dir(tmp_path / "a", tmp_path / "b", "index")
    assert funnel(tmp_path / "a")[0]["n_in"] == funnel(tmp_path / "b")[0]["n_in"] == 400
    # shutting the cluster down quietens Dask, not the driver: a later run in this process still logs
    assert logging.root.manager.disable == logging.NOTSET


def test_quieting_dask_keeps_loggers_that_are_quieter_already():
    from curate.engine.dask import _quiet_dask_logs

    names = ("bokeh.server.util", "distributed.scheduler")
    before = {n: logging.getLogger(n).level for n in names}
    try:
        logging.getLogger("bokeh.server.util").setLevel(logging.ERROR)
        logging.getLogger("distributed.scheduler").setLevel(logging.INFO)
        _quiet_dask_logs()
        assert logging.getLogger("bokeh.server.util").level == logging.ERROR
        assert logging.getLogger("distributed.scheduler").level == logging.WARNING
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def real_cluster(tmp_path: Path):
    """`dask scheduler` + 2 `dask worker` processes on 127.0.0.1."""
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(2)
    for _ in range(2):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--host",
                                       "127.0.0.1", "--no-dashboard"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(addr, timeout="30s") as c:
        c.wait_for_workers(2, timeout=60)
    yield addr, procs
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


@pytest.mark.slow
def test_real_dask_cluster_matches_inprocess(pool: Path, tmp_path: Path, real_cluster):
    addr, _ = real_cluster
    inp = str(pool / "*.tar")
    a = run_pipeline(make_pipeline("index"), make_config(inp, tmp_path / "a"))
    b = run_pipeline(make_pipeline("index"), make_config(inp, tmp_path / "b", kind="address", address=addr))
    assert a.ok and b.ok
    tables_equal_dir(tmp_path / "a", tmp_path / "b", "index")


def _stats_files(work: Path) -> list[Path]:
    return sorted((work / "stats").glob("*/*.parquet"))


@pytest.mark.slow
def test_driver_killed_then_rerun_completes_identically(tmp_path: Path):
    from curate.tools.synth import synthesize

    pool = tmp_path / "pool"
    synthesize(pool, samples=1200, shards=12, seed=3)
    ref = run_pipeline(make_pipeline("index"), make_config(str(pool / "*.tar"), tmp_path / "ref"))
    assert ref.ok
    work = tmp_path / "w"
    cmd = [str(BIN / "curate"), "run", str(ROOT / "pipelines" / "index.yaml"), "--input", str(pool / "*.tar"),
           "--workdir", str(work), "--config", str(ROOT / "configs" / "local.yaml")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _stats_files(work) and p.poll() is None:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its LocalCluster workers
    p.wait()
    done_before = len(_stats_files(work))
    assert 0 < done_before < 12, f"kill landed at {done_before} finished shards"
    # atomic writes: every visible Parquet file is whole (a killed write leaves only a hidden .tmp)
    import pyarrow.parquet as pq

    for f in work.rglob("*.parquet"):
        pq.read_metadata(f)
    again = run_pipeline(make_pipeline("index"), make_config(str(pool / "*.tar"), work))
    assert again.ok
    assert again.stages[0].skipped == done_before and again.stages[0].done == 12 - done_before
    tables_equal_dir(tmp_path / "ref", work, "index")
    assert funnel(work) [0]["n_in"] == funnel(tmp_path / "ref")[0]["n_in"] == 1200
