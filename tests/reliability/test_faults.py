"""Worker death, driver death, unwritable or full disks: the run finishes (or says why) and the
outputs are byte-identical to an undisturbed run, with nothing lost or duplicated."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from curate.engine import make_executor
from curate.report.export import ExportSpec, export
from curate.runner.pipeline import run_pipeline
from curate.tools.synth import synthesize
from tests.conftest import ROOT, make_config, make_pipeline

BIN = Path(sys.executable).parent
PIPE = make_pipeline(("text", {}), ("image", {"max_dominant_share": 0.97, "min_blur_var": 20.0}),
                     ("dedup", {}))


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bigpool")
    synthesize(out, samples=1600, shards=8, seed=21)
    return out


@pytest.fixture(scope="module")
def reference(big_pool: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ref")
    assert run_pipeline(PIPE, make_config(str(big_pool / "*.tar"), work)).ok
    with make_executor(make_config("x", work)) as ex:
        export(work, work.parent / f"{work.name}-out", ex, ExportSpec(shard_size=150))
    return work


def differing(a: Path, b: Path, sub: str) -> int:
    """Files under ``sub`` whose decisions/values differ (stats are excluded: they hold timings)."""
    fa = {p.relative_to(a) for p in (a / sub).rglob("*") if p.is_file() and not p.name.startswith(".")}
    fb = {p.relative_to(b) for p in (b / sub).rglob("*") if p.is_file() and not p.name.startswith(".")}
    n = len(fa ^ fb)
    for rel in fa & fb:
        if rel.suffix == ".parquet":
            n += not pq.read_table(a / rel).equals(pq.read_table(b / rel))
        else:
            n += (a / rel).read_bytes() != (b / rel).read_bytes()
    return n


def lost(work: Path, pool_rows: int) -> int:
    idx = pl.read_parquet(work / "index" / "*.parquet")
    return pool_rows - idx["uid"].n_unique() + (idx.height - idx["uid"].n_unique())


def _kill_a_worker_when(ex, cond, during, killed: list) -> None:
    """SIGKILL a worker once ``cond()`` holds; record (victim, whether ``cond`` held, whether the
    phase was still running just after the kill: ``during()``), so the test knows where it hit."""
    deadline = time.time() + 120
    met = False
    while time.time() < deadline and not (met := cond()):
        time.sleep(0.01)
    pids = ex.client.run(os.getpid)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    killed.append((victim, met, during()))


@pytest.mark.parametrize("phase", ["map", "global", "export"])
@pytest.mark.slow
def test_worker_killed_mid_stage(big_pool: Path, reference: Path, tmp_path: Path, phase: str, record):
    work = tmp_path / "w"
    cfg = make_config(str(big_pool / "*.tar"), work, kind="local_cluster", retries=3)
    conds = {
        "map": lambda: len(list((work / "stats" / "image").glob("*.parquet"))) >= 2,
        "global": lambda: len(list((work / "partials" / "dedup").glob("*.parquet"))) >= 2,
        "export": lambda: any(tmp_path.glob(".out.partial-*/metadata")),
    }
    running = {  # the phase has not finished yet
        "map": lambda: len(list((work / "stats" / "image").glob("*.parquet"))) < 8,
        "global": lambda: not list(work.glob("runs/*/summary.json")),
        "export": lambda: not (tmp_path / "out").exists(),
    }
    killed: list = []
    with make_executor(cfg) as ex:
        t = threading.Thread(target=_kill_a_worker_when, args=(ex, conds[phase], running[phase], killed), daemon=True)
        t.start()
        s = run_pipeline(PIPE, cfg, executor=ex)
        m = export(work, tmp_path / "out", ex, ExportSpec(shard_size=150))
        t.join(timeout=130)
    assert killed, "the fault was not injected"
    assert killed[0][1] and killed[0][2], f"the worker was not killed during {phase}: {killed}"
    assert s.ok, s.problems()
    diff = sum(differing(reference, work, sub) for sub in ("index", "text", "image", "dedup"))
    ref_out = reference.parent / f"{reference.name}-out"
    diff += differing(ref_out, tmp_path / "out", "shards") + differing(ref_out, tmp_path / "out", "metadata")
    n_lost = lost(work, 1600)
    record(f"worker SIGKILL during {phase}", 1, n_lost, diff)
    assert diff == 0 and n_lost == 0 and m["samples_in"] == 1600


def _run_cmd(tmp_path: Path, pool: Path, work: Path) -> list[str]:
    """`curate run` of PIPE on a LocalCluster, as a user would start it."""
    import yaml

    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump(PIPE.model_dump(mode="json")))
    return [str(BIN / "curate"), "run", str(pipeline), "--input", str(pool / "*.tar"), "--workdir", str(work),
            "--config", str(ROOT / "configs" / "local.yaml")]


def _stats(work: Path) -> int:
    return len(list((work / "stats").rglob("*.parquet")))


@pytest.mark.slow
def test_driver_killed_several_times_then_rerun(big_pool: Path, reference: Path, tmp_path: Path, record):
    work = tmp_path / "w"
    cmd = _run_cmd(tmp_path, big_pool, work)
    kills = 0
    for target in (3, 10, 17):  # stats files done when the driver dies (8 shards x 3 stages + index)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline and _stats(work) < target and p.poll() is None:
            time.sleep(0.005)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        assert not any(f.suffix == ".parquet" and f.stat().st_size == 0 for f in work.rglob("*"))
    assert kills >= 2
    done_before = _stats(work)
    s = run_pipeline(PIPE, make_config(str(big_pool / "*.tar"), work))
    assert s.ok
    redone = sum(st.done for st in s.stages)
    assert redone == 32 - done_before  # finished shards were not recomputed (dedup apply counts too)
    diff = sum(differing(reference, work, sub) for sub in ("index", "text", "image", "dedup"))
    n_lost = lost(work, 1600)
    record(f"driver SIGKILL x{kills}, then rerun", 1, n_lost, diff)
    assert diff == 0 and n_lost == 0


def test_unwritable_work_dir_is_a_clear_error(big_pool: Path, tmp_path: Path, record):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = subprocess.run([str(BIN / "curate"), "run", str(ROOT / "pipelines" / "index.yaml"), "--input",
                        str(big_pool / "00000.tar"), "--workdir", str(blocker / "work")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and str(blocker) in r.stderr and "Traceback" not in r.stderr
    record("work dir path blocked by a file", 0, 0, 0)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))


@pytest.mark.slow
def test_disk_full_mid_run_then_rerun(big_pool: Path, reference: Path, tmp_path: Path, record):
    work = tmp_path / "w"
    cmd = _run_cmd(tmp_path, big_pool, work)
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert r.returncode != 0
    assert "cannot write" in r.stderr and str(work) in r.stderr, r.stderr[-2000:]
    s = run_pipeline(PIPE, make_config(str(big_pool / "*.tar"), work))
    assert s.ok
    diff = sum(differing(reference, work, sub) for sub in ("index", "text", "image", "dedup"))
    n_lost = lost(work, 1600)
    record("file writes fail (EFBIG) mid-run, then rerun", 1, n_lost, diff)
    assert diff == 0 and n_lost == 0


def test_export_never_destroys_data(big_pool: Path, reference: Path, tmp_path: Path, record, monkeypatch):
    """Export aimed at the input folder or at a user's folder is refused; an --overwrite that fails
    half way leaves the earlier export whole. Inputs and the earlier export stay byte-identical."""
    import curate.report.export as export_mod
    from curate.io.parquet import WorkDirError

    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    inputs = snapshot(big_pool)
    out = tmp_path / "out"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.pdf").write_bytes(b"%PDF irreplaceable")
    with make_executor(make_config("x", reference)) as ex:
        export(reference, out, ex, ExportSpec(shard_size=150))
        earlier = snapshot(out)
        refused = 0
        for target in (big_pool, big_pool.parent, user):
            try:
                export(reference, target, ex, ExportSpec(shard_size=150, overwrite=True))
            except WorkDirError:
                refused += 1
        calls = {"n": 0}
        real = export_mod.write_output_shard

        def dies_on_third(out_dir, job):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk went away")
            return real(out_dir, job)

        monkeypatch.setattr(export_mod, "write_output_shard", dies_on_third)
        with pytest.raises(RuntimeError):
            export(reference, out, ex, ExportSpec(shard_size=150, overwrite=True))
    differ = int(snapshot(big_pool) != inputs) + int(snapshot(out) != earlier) + int(snapshot(user) != {"thesis.pdf": b"%PDF irreplaceable"})
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    record("export onto inputs / a user's folder / failing mid --overwrite", 1, 0, differ + len(leftovers))
    assert refused == 3 and differ == 0 and leftovers == []
