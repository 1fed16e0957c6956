"""One run at a time per work dir: the second refuses, a dead run's lease is taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.core.config import ConfigError
from curate.io.lease import LEASE
from curate.runner.pipeline import run_pipeline
from tests.conftest import ROOT, make_config, make_pipeline

PIPE = make_pipeline(("text", {}))


def _lease(work: Path, pid: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / LEASE).write_text(json.dumps({"run_id": "other-run", "host": socket.gethostname(), "pid": pid,
                                          "since": "2026-01-01T00:00:00+00:00"}))


def test_a_live_lease_refuses_and_a_dead_one_is_taken_over(pool: Path, tmp_path: Path):
    work = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lease(work, holder.pid)
        with pytest.raises(ConfigError, match="in use by run other-run"):
            run_pipeline(PIPE, make_config(str(pool / "*.tar"), work))
        assert not (work / "index").exists()
    finally:
        holder.kill()
        holder.wait()
    _lease(work, holder.pid)  # its process is gone now: a stale lease
    assert run_pipeline(PIPE, make_config(str(pool / "*.tar"), work)).ok
    assert not (work / LEASE).exists()  # released at the end


@pytest.mark.slow
def test_two_cli_runs_on_one_work_dir(pool: Path, tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("executor: {kind: local_cluster, n_workers: 1}\ndevice: cpu\n")
    args = [sys.executable, "-m", "curate.cli", "run", str(ROOT / "pipelines" / "datacomp_basic.yaml"),
            "--config", str(cfg), "--input", str(pool / "*.tar"), "--workdir", str(tmp_path / "w")]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not (tmp_path / "w" / LEASE).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "is in use by run" in second.stderr and "Traceback" not in second.stderr


def test_the_lease_is_taken_before_preflight(pool: Path, tmp_path: Path):
    """A second run is refused at once: not after checking every model (a CLIP preflight takes tens of
    seconds) and not with the preflight's own complaints."""
    work = tmp_path / "w"
    missing_weights = make_pipeline(("clip_score", {"model": "curate-tiny", "pretrained": str(tmp_path / "no.pt")}))
    _lease(work, os.getpid())
    with pytest.raises(ConfigError, match="in use by run other-run") as e:
        run_pipeline(missing_weights, make_config(str(pool / "*.tar"), work))
    assert "preflight" not in str(e.value)
    (work / LEASE).unlink()
    with pytest.raises(ConfigError, match="preflight"):
        run_pipeline(missing_weights, make_config(str(pool / "*.tar"), work))
    assert not (work / LEASE).exists()  # a refused run leaves no lease behind
