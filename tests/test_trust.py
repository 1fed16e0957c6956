"""What a newcomer meets first: outputs that never destroy data, a run that fails before any work,
a funnel that belongs to one run, a CLI that explains itself, progress without a terminal."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from curate.core.config import ConfigError
from curate.engine import make_executor
from curate.report.export import MARKER, ExportSpec, export
from curate.io.parquet import WorkDirError
from curate.runner.pipeline import run_pipeline
from curate.report.stats import format_funnel, funnel, stale_stages
from tests.conftest import ROOT, make_config, make_pipeline

CLI = [sys.executable, "-m", "curate.cli"]
BASIC = make_pipeline(("text", {}), ("image", {"min_side": 200, "max_aspect": 3.0}))
TEXT_ONLY = make_pipeline(("text", {"min_words": 4}))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Path:
    from curate.tools.synth import synthesize

    root = tmp_path_factory.mktemp("data")
    synthesize(root / "shards", samples=120, shards=2, seed=3)
    return root / "shards"


@pytest.fixture(scope="module")
def done_work(small_pool: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work")
    assert run_pipeline(BASIC, make_config(str(small_pool / "*.tar"), work)).ok
    return work


def _export(work: Path, out: Path, **spec) -> dict:
    with make_executor(make_config("unused", work)) as ex:
        return export(work, out, ex, ExportSpec(shard_size=50, **spec))


# 1. outputs never destroy data ------------------------------------------------------------------

def test_export_refuses_a_folder_holding_the_inputs(done_work: Path, small_pool: Path):
    before = {p: p.read_bytes() for p in small_pool.glob("*.tar")}
    for out in (small_pool.parent, small_pool, small_pool / "curated"):
        with pytest.raises(WorkDirError, match="input shards"):
            _export(done_work, out, overwrite=True)
    assert {p: p.read_bytes() for p in small_pool.glob("*.tar")} == before
    assert not (small_pool / "curated").exists()


def test_export_refuses_the_work_dir_and_foreign_files(done_work: Path, tmp_path: Path):
    with pytest.raises(WorkDirError, match="work dir"):
        _export(done_work, done_work / "out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(WorkDirError, match="did not write"):
        _export(done_work, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1


def test_export_replaces_its_own_output_only_with_overwrite(done_work: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = _export(done_work, out)
    assert (out / MARKER).is_file() and (out / "uids.npy").is_file()
    stamp = (out / "manifest.json").read_bytes()
    with pytest.raises(WorkDirError, match="--overwrite"):
        _export(done_work, out)
    assert (out / "manifest.json").read_bytes() == stamp
    (out / "shards" / "99999.tar").write_bytes(b"left over")  # replaced whole, not merged
    again = _export(done_work, out, overwrite=True)
    assert again["samples_kept"] == first["samples_kept"]
    assert not (out / "shards" / "99999.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def test_cli_export_into_input_folder_is_one_line_no_traceback(done_work: Path, small_pool: Path):
    r = _cli("export", str(done_work), "--out", str(small_pool.parent))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "input shards" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# 2. fail fast, before any work, in one message ---------------------------------------------------

def test_preflight_missing_checkpoint_and_offline_hub_tag(small_pool: Path, tmp_path: Path):
    pipe = make_pipeline(("clip_score", {"model": "curate-tiny", "pretrained": "missing/scorer.pt"}),
                         ("clip_rank", {"calibrate": {"heldout": str(tmp_path / "nothing" / "*.tar")}}))
    work = tmp_path / "w"
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        run_pipeline(pipe, make_config(str(small_pool / "*.tar"), work))
    msg = str(e.value)
    assert time.monotonic() - t < 60
    assert "2 problem(s)" in msg and "missing/scorer.pt" in msg and "calibrate.heldout" in msg
    assert not (work / "index").exists()  # nothing ran

    hub = make_pipeline(("clip_score", {"model": "ViT-B-32", "pretrained": "openai"}))
    with pytest.raises(ConfigError) as e:  # HF_HUB_OFFLINE=1 (conftest): no request is made
        run_pipeline(hub, make_config(str(small_pool / "*.tar"), tmp_path / "w2"), executor=None)
    assert "not cached" in str(e.value) and "curate models fetch ViT-B-32 openai" in str(e.value)


@pytest.mark.slow
def test_cli_preflight_is_quick_and_quiet(small_pool: Path, tmp_path: Path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: p\nstages:\n  - name: clip_score\n    params: {model: ViT-B-32, pretrained: openai}\n")
    t = time.monotonic()
    r = _cli("run", str(pipe), "--input", str(small_pool / "*.tar"), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2 and time.monotonic() - t < 60
    assert "Traceback" not in r.stderr and "curate models fetch" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 4


@pytest.mark.parametrize("cmd", ["export", "report", "stats"])
def test_not_a_work_dir_is_a_clear_error_and_writes_nothing(tmp_path: Path, cmd: str):
    folder = tmp_path / "photos"
    folder.mkdir()
    extra = ["--out", str(tmp_path / "o")] if cmd == "export" else []
    r = _cli(cmd, str(folder), *extra)
    assert r.returncode == 2 and "not a curate work dir" in r.stderr and "Traceback" not in r.stderr
    assert list(folder.iterdir()) == [] and not (tmp_path / "o").exists()


# 3. a run owns its funnel -------------------------------------------------------------------------

def test_funnel_shows_the_latest_pipeline_only(small_pool: Path, tmp_path: Path):
    work = tmp_path / "w"
    cfg = make_config(str(small_pool / "*.tar"), work)
    first = run_pipeline(BASIC, cfg)
    assert [r["stage"] for r in funnel(work)] == ["index", "text", "image"]
    second = run_pipeline(TEXT_ONLY, cfg)
    rows = funnel(work)
    assert [r["stage"] for r in rows] == ["index", "text"]
    assert stale_stages(work) == ["image"]
    assert rows[1]["n_in"] == 120 and all(r["complete"] for r in rows)
    text = format_funnel(rows, stale_stages(work))
    assert "stale" in text and "image" in text and "overall: kept" in text
    # the earlier run can still be read back by its id
    assert [r["stage"] for r in funnel(work, first.run_id)] == ["index", "text", "image"]
    assert second.run_id != first.run_id


def test_incomplete_run_says_so(small_pool: Path, tmp_path: Path):
    work = tmp_path / "w"
    run_pipeline(BASIC, make_config(str(small_pool / "*.tar"), work))
    next((work / "stats" / "image").glob("*.parquet")).unlink()
    rows = funnel(work)
    assert rows[-1]["shards"] == 1 and not rows[-1]["complete"]
    assert "INCOMPLETE" in format_funnel(rows)


# 4. self-describing ------------------------------------------------------------------------------

def test_stages_version_and_verbose_anywhere():
    r = _cli("stages")
    assert r.returncode == 0
    from curate.runner.registry import available_stages

    for name in available_stages():
        assert name in r.stdout
    r = _cli("stages", "clip_rank", "-v")  # -v after the subcommand
    assert r.returncode == 0 and "calibrate.heldout" in r.stdout and "top_fraction" in r.stdout
    r = _cli("stages", "nope")
    assert r.returncode == 2 and "unknown stage" in r.stderr
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("curate ")
    r = _cli("export", "--help")
    assert "default:" in r.stdout  # help shows defaults


def test_reference_pages_are_generated_from_the_code():
    """The docs site's reference pages are built from the registry, the parser and the config
    models (docs/hooks.py), so they cannot go stale: each names every stage or command."""
    from curate.reference_docs import PAGES
    from curate.runner.registry import available_stages

    pages = {name: make() for name, make in PAGES.items()}
    for name in available_stages():
        assert f"## `{name}`" in pages["stages.md"] and f"| {name} |" in pages["columns.md"], name
        assert f" {name} " in pages["makefile.md"] or f" {name}\n" in pages["makefile.md"], name
    for cmd in ("run", "stats", "export", "report", "ingest", "stages", "models fetch"):
        assert f"## `curate {cmd}`" in pages["cli.md"], cmd
    assert "`executor.kind`" in pages["config.md"] and "`stages[].params`" in pages["config.md"]


def test_every_parameter_and_column_is_described():
    from curate.reference_docs import stage_columns
    from curate.runner.registry import available_stages, describe_stage

    for name in available_stages():
        assert [p["name"] for p in describe_stage(name)["params"] if not p["description"]] == [], name
        assert [c for c, _, doc in stage_columns(name) if not doc] == [], name


def test_parquet_columns_carry_their_descriptions(done_work: Path):
    import pyarrow.parquet as pq

    schema = pq.read_schema(next((done_work / "image").glob("*.parquet")))
    assert b"blurry" in schema.field("blur_var").metadata[b"description"]
    assert schema.field("keep_image").metadata[b"description"].startswith(b"the stage's decision")


# 5. progress you can watch -------------------------------------------------------------------------

def test_progress_lines_without_a_terminal(caplog):
    from curate.engine.local import LocalExecutor
    from curate.engine import progress

    caplog.set_level(logging.INFO, logger="curate.progress")
    orig = progress.Progress.__init__

    def fast(self, label, total, every_s=10.0):
        orig(self, label, total, every_s=0.0)

    progress.Progress.__init__ = fast
    try:
        LocalExecutor().map(lambda x: time.sleep(0.01) or x, list(range(4)), label="stage-x")
    finally:
        progress.Progress.__init__ = orig
    lines = [r.getMessage() for r in caplog.records if r.name == "curate.progress"]
    assert any("stage-x: 2/4 shards" in m and "ETA" in m for m in lines)
    assert lines[-1].startswith("stage-x: 4/4 shards in")


# 7. make clean keeps the slow things ----------------------------------------------------------------

def test_make_clean_keeps_models_and_pools(tmp_path: Path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    for d in ("demo/models", "demo/pool-v3-5000x10-seed0", "demo/work", "demo/out", "work"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "f").write_text("x")
    r = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "demo/models/f").exists() and (tmp_path / "demo/pool-v3-5000x10-seed0/f").exists()
    assert not (tmp_path / "demo/work").exists() and not (tmp_path / "work").exists()


def test_export_with_datacomp_column_names(done_work: Path, tmp_path: Path):
    import polars as pl

    m = _export(done_work, tmp_path / "out", schema="datacomp")
    meta = pl.read_parquet(tmp_path / "out" / "metadata" / "*.parquet")
    assert {"uid", "url", "text", "original_width", "original_height", "sha256"} <= set(meta.columns)
    assert "caption" not in meta.columns and meta.height == m["samples_kept"]
    import webdataset as wds

    caps = {s["__key__"]: s["txt"] for s in wds.WebDataset(str(tmp_path / "out" / "shards" / "00000.tar"),
                                                            shardshuffle=False)}
    assert caps and all(c for c in caps.values())  # captions still reach the tars


@pytest.mark.parametrize("after", ["pipeline datacomp_basic", "dask dashboard:"])
def test_ctrl_c_while_the_cluster_starts_is_one_message(small_pool: Path, tmp_path: Path, after: str):
    """Ctrl-C as the run starts its LocalCluster, and as soon as the cluster is up: exit 130, a
    short message, no traceback. The signal follows a line of the run's log, not a delay, so the run
    cannot have finished before it on a fast machine."""
    import signal

    cfg = tmp_path / "c.yaml"
    cfg.write_text("executor: {kind: local_cluster, n_workers: 2}\ndevice: cpu\n")
    p = subprocess.Popen([*CLI, "run", str(ROOT / "pipelines" / "datacomp_basic.yaml"), "--config", str(cfg),
                          "--input", str(small_pool / "*.tar"), "--workdir", str(tmp_path / "w")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=os.environ | {"PYTHONPATH": str(ROOT)})
    watchdog = threading.Timer(120, p.kill)  # a run that hangs silently fails the test, not the suite
    watchdog.start()
    seen = []
    for line in p.stderr:
        seen.append(line)
        if after in line:
            break
    else:
        p.wait(timeout=120)
        pytest.fail(f"the run ended (exit {p.returncode}) without logging {after!r}: {''.join(seen)[-3000:]}")
    # a run starting as it should warns of nothing (bokeh's note on the local dashboard is silenced)
    assert not [line for line in seen if " WARNING " in line], "".join(seen)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    err = "".join(seen) + p.stderr.read()
    watchdog.cancel()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "rerun the same command to resume" in err and len(err.strip().splitlines()) <= 12, err[-3000:]


def test_ctrl_c_on_a_terminal_reaches_the_workers_too_and_still_prints_one_message(small_pool: Path, tmp_path: Path):
    """A terminal sends Ctrl-C to the whole process group, LocalCluster workers included: they
    leave the answer to the driver instead of printing a KeyboardInterrupt traceback each."""
    import signal

    cfg = tmp_path / "c.yaml"
    cfg.write_text("executor: {kind: local_cluster, n_workers: 2}\ndevice: cpu\n")
    p = subprocess.Popen([*CLI, "run", str(ROOT / "pipelines" / "datacomp_basic.yaml"), "--config", str(cfg),
                          "--input", str(small_pool / "*.tar"), "--workdir", str(tmp_path / "w")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=os.environ | {"PYTHONPATH": str(ROOT)}, start_new_session=True)
    watchdog = threading.Timer(120, lambda: os.killpg(p.pid, signal.SIGKILL))
    watchdog.start()
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "fused:" in line:
            break
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=120)
    err = "".join(seen) + p.stderr.read()
    watchdog.cancel()
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "rerun the same command to resume" in err and len(err.strip().splitlines()) <= 8, err[-3000:]


# 8. an export is one run's, and explains its columns ------------------------------------------------

def test_export_of_an_older_run_refuses_once_a_later_run_rewrote_its_tables(small_pool: Path, tmp_path: Path):
    from curate.report.decisions import run_record

    work = tmp_path / "w"
    cfg = make_config(str(small_pool / "*.tar"), work)
    old = run_pipeline(BASIC, cfg).run_id
    assert _export(work, tmp_path / "ok", run_id=old)["run_id"] == old  # its own tables: fine
    new = run_pipeline(make_pipeline(("text", {"min_words": 6}), ("image", {"min_side": 200, "max_aspect": 3.0})), cfg)
    with pytest.raises(WorkDirError, match=rf"stage\(s\) text, image are not its own on 2 shard\(s\).*"
                                           rf"rewritten since by run {new.run_id}.*curate run .*{old}.pipeline.yaml"):
        _export(work, tmp_path / "mixed", run_id=old)
    assert not (tmp_path / "mixed").exists()
    r = _cli("export", str(work), "--out", str(tmp_path / "mixed"), "--run", old, "--config",
             str(_inprocess_config(tmp_path)))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "mix two runs" in r.stderr
    # the command the message names restores the old run's tables; the export then holds its decisions only
    rd = work / "runs" / old
    r = _cli("run", str(rd / "pipeline.yaml"), "--config", str(rd / "config.yaml"))
    assert r.returncode == 0, r.stderr
    m = _export(work, tmp_path / "restored", run_id=old)
    assert m["stages"] == run_record(work, old)["stages"]


def _inprocess_config(tmp_path: Path) -> Path:
    p = tmp_path / "inprocess.yaml"
    p.write_text("executor: {kind: inprocess}\n")
    return p


def test_exported_parquet_keeps_descriptions_and_only_computed_columns(done_work: Path, tmp_path: Path):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    _export(done_work, out)
    for folder in ("metadata", "pool"):
        schema = pq.read_schema(next((out / folder).glob("*.parquet")))
        undescribed = [f.name for f in schema if not (f.metadata or {}).get(b"description")]
        assert not undescribed, (folder, undescribed)
        # BASIC measures sizes only: no pixel measure, no metadata score column was computed
        assert not {"blur_var", "phash", "color_sig", "clip_l14_similarity_score"} & set(schema.names)
        assert {"img_width", "aspect", "lang", "caption", "sha256"} <= set(schema.names)
    pool = pq.read_table(next((out / "pool").glob("*.parquet")))
    assert "kept" in pool.column_names and pool.schema.field("reason").metadata[b"description"]


# 9. a command line that explains itself -------------------------------------------------------------

def test_every_option_and_argument_has_help():
    import argparse

    from curate.cli import build_parser

    def bare(p: argparse.ArgumentParser, where: str) -> list[str]:
        out = []
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                out += [x for name, sub in a.choices.items() for x in bare(sub, f"{where} {name}")]
            elif not a.help:
                out.append(f"{where} {'/'.join(a.option_strings) or a.dest}")
        return out

    assert bare(build_parser(), "curate") == []


def test_stages_tables_fit_the_terminal_and_a_closed_pipe_is_quiet():
    env = os.environ | {"PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    listing = subprocess.run([*CLI, "stages"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    lines = listing.stdout.splitlines()
    assert listing.returncode == 0 and max(map(len, lines)) <= 100
    assert any(ln.startswith("metadata_embeddings  map ") for ln in lines), listing.stdout
    for stage in ("image", "dedup", "clip_rank"):
        one = subprocess.run([*CLI, "stages", stage], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert one.returncode == 0 and max(map(len, one.stdout.splitlines())) <= 100, one.stdout
    piped = subprocess.run(f"{sys.executable} -m curate.cli stages clip_score | head -1", shell=True,
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert piped.stdout.startswith("clip_score") and piped.stderr == "", piped.stderr


def test_a_work_dir_on_object_storage_without_credentials_is_one_line(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    for cmd in (["stats", "s3://some-bucket/work"], ["export", "s3://some-bucket/work", "--out", str(tmp_path / "o")]):
        r = subprocess.run([*CLI, *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert len(r.stderr.strip().splitlines()) == 1 and "--config" in r.stderr and "credentials" in r.stderr.lower()


def test_the_command_line_starts_without_the_heavy_libraries():
    """`curate --version` and `--help` load none of the data libraries; listing the stages loads
    neither torch nor Dask nor open_clip (their import is most of a slow start)."""
    probe = ("import sys, runpy; sys.argv = ['curate', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('curate.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "heavy = ('torch', 'polars', 'pyarrow', 'dask', 'distributed', 'open_clip', 'pydantic', 'scipy')\n"
             "print('LOADED', sorted(m for m in heavy if m in sys.modules), file=sys.stderr)")
    env = os.environ | {"PYTHONPATH": str(ROOT)}

    def loaded(*args: str) -> str:
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=120)
        return r.stderr.strip().splitlines()[-1]

    assert loaded("--version") == "LOADED []"
    assert loaded("--help") == "LOADED []"
    assert loaded("run", "--help") == "LOADED []"
    stages = loaded("stages")
    assert not {"'torch'", "'dask'", "'distributed'", "'open_clip'", "'scipy'"} & set(stages[8:-1].split(", ")), stages


def test_a_run_over_a_pool_without_a_sample_is_an_error(tmp_path: Path):
    import tarfile

    for i in range(2):
        tarfile.open(tmp_path / f"{i:05d}.tar", "w").close()
    cfg = _inprocess_config(tmp_path)
    r = _cli("run", str(ROOT / "pipelines" / "datacomp_basic.yaml"), "--config", str(cfg),
             "--input", str(tmp_path / "*.tar"), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the input holds no sample (2 shard(s) read" in r.stderr
