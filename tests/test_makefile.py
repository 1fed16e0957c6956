"""Makefile targets per stage and `make help`: thin calls of the CLI, one per registered stage."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from curate.runner.registry import available_stages
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")


def _make(*args: str) -> subprocess.CompletedProcess:
    # a fresh make: not the variables of a `make test ARGS=...` this suite may be running under
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_every_stage_has_a_target_and_help_lists_it():
    files = sorted(p.stem for p in (ROOT / "curate" / "stages").glob("*.py") if p.stem != "__init__")
    assert files == available_stages()  # a stage is one file named as the stage: the Makefile lists the files
    r = _make()  # plain `make` is `make help`
    assert r.returncode == 0, r.stderr
    for target in [*available_stages(), "demo", "test", "run", "export", "report", "stats", "clean", "distclean"]:
        assert re.search(rf"\b{target}\b", r.stdout), target
    assert "PIPELINE=" in r.stdout and "WORKDIR=" in r.stdout


@pytest.mark.slow
def test_make_text_then_make_dedup(tmp_path: Path):
    from curate.tools.synth import synthesize

    synthesize(tmp_path / "pool", samples=90, shards=2, seed=4)
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: p\nstages:\n  - name: text\n  - name: image\n"
                    "  - name: dedup\n    params: {exact: [image], phash_radius: 4, keep: smallest_uid}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("executor: {kind: inprocess}\ndevice: cpu\n")
    work = tmp_path / "work"
    common = [f"PIPELINE={pipe}", f"CONFIG={cfg}", f"INPUT={tmp_path / 'pool' / '*.tar'}", f"WORKDIR={work}"]

    r = _make("text", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in work.iterdir() if (work / "stats" / p.name).exists()) == ["index", "text"]
    text_stats = sorted((work / "stats" / "text").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in text_stats]

    r = _make("dedup", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    for stage in ("index", "text", "image", "dedup"):
        assert len(list((work / stage).glob("*.parquet"))) == 2, stage
    assert [p.stat().st_mtime_ns for p in text_stats] == stamps  # done upstream stages were skipped
    d = pl.read_parquet(work / "dedup" / "*.parquet")
    assert d.height == 90 and "keep_dedup" in d.columns

    r = _make("reference_filter", *common)  # not in this pipeline: a clear error, no traceback
    assert r.returncode != 0 and "no stage 'reference_filter'" in r.stderr and "Traceback" not in r.stderr
