"""A cluster whose worker does not see the driver's disk (a node with no shared filesystem): the
run stops before any task with a message naming the worker and the paths. The worker runs in its
own mount namespace with an empty tmpfs over the test's folder (``unshare``; skipped where the
machine does not allow it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from tests.conftest import ROOT, make_config, make_pipeline
from tests.engine.test_engines import _free_port

BIN = Path(sys.executable).parent


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs none /mnt 2>/dev/null || mount -t tmpfs none /tmp"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="mount namespaces (unshare -m) not permitted here")
@pytest.mark.slow
def test_a_worker_without_the_drivers_disk_is_named_before_any_work(pool: Path, tmp_path: Path):
    work = tmp_path / "work"
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    hidden = os.path.commonpath([pool, tmp_path])  # the pool and the work dir, for that worker
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2)
        worker = (f"mount -t tmpfs none {hidden} && exec {BIN / 'dask'} worker "
                  f"{addr} --nthreads 1 --host 127.0.0.1 --no-dashboard")
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", worker], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(1, timeout=60)
        with pytest.raises(ConfigError) as e:
            run_pipeline(make_pipeline("index"), make_config(str(pool / "*.tar"), work, kind="address", address=addr))
        msg = str(e.value)
        assert "cannot see the work dir" in msg and str(pool / "00000.tar") in msg and "no shared disk" in msg
        assert not (work / "index").exists()  # nothing ran
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.mark.skipif(not _can_unshare(), reason="mount namespaces (unshare -m) not permitted here")
@pytest.mark.slow
def test_two_workers_without_the_drivers_disk_run_on_an_s3_work_dir(s3, tmp_path: Path):
    """A real `dask scheduler` and two `dask worker` processes, each in its own mount namespace
    with an empty tmpfs over the driver's temp folders and its own working and temp dir: no path in
    common with the driver. Input and work dir are on the S3 endpoint; a global stage (dedup) runs
    its combine on one worker and its apply on both. Decisions equal an in-process local run's."""
    from curate.report.decisions import decisions
    from tests.conftest import BUCKET

    endpoint, pool = s3
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    hidden = os.path.commonpath([pool, tmp_path])
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    pipe = make_pipeline(("text", {"min_words": 3}), ("image", {"min_blur_var": 20.0}),
                         ("dedup", {"exact": ["image"], "phash_radius": 4}))
    try:
        time.sleep(2)
        for i in range(2):
            own = f"{hidden}/worker-{i}"
            worker = (f"mount -t tmpfs none {hidden} && mkdir -p {own} && cd {own} && TMPDIR={own} exec "
                      f"{BIN / 'dask'} worker {addr} --nthreads 1 --host 127.0.0.1 --no-dashboard "
                      f"--local-directory {own}")
            procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", worker],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
            seen = c.run(os.path.exists, str(pool / "00000.tar"))
        assert list(seen.values()) == [False, False]  # the workers really do not see the driver's files
        work = f"s3://{BUCKET}/cluster/work"
        cfg = make_config(f"s3://{BUCKET}/pool/*.tar", work, kind="address", address=addr).model_copy(
            update={"storage_options": {"s3": {"endpoint_url": endpoint}}})
        summary = run_pipeline(pipe, cfg)
        assert summary.ok, summary.problems()
        assert [(r.stage_id, r.done) for r in summary.stages] == [
            ("index", 3), ("text", 3), ("image", 3), ("dedup", 3)]
        remote = decisions(work)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "local")).ok
    local = decisions(tmp_path / "local")
    assert remote.equals(local) and 0 < remote["kept"].sum() < remote.height
