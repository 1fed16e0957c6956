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
from curate.core.pipeline import run_pipeline
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
