"""The demo checks itself: a smaller demo pool through `python -m curate.tools.demo` must pass the same
bounds as `make demo` (clean kept >= 90 %, each non-duplicate defect removed >= 95 %, at most one
sample kept per duplicate group). The scorer is the demo's own (deterministic training), trained
into demo/models once and reused by `make demo` afterwards, as `make demo` would."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from curate.tools.demo import Bounds, format_checks, self_check
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> tuple[str, Path]:
    out_dir = tmp_path_factory.mktemp("demo")
    r = subprocess.run([sys.executable, "-m", "curate.tools.demo", "--samples", "1500", "--shards", "3",
                        "--dir", str(out_dir), "--models", str(ROOT / "demo" / "models")],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout, out_dir


def _checks(out: str) -> dict[str, bool]:
    return {m.group(2).strip(): m.group(1) == "PASS"
            for m in re.finditer(r"^  (PASS|FAIL)  (.{46})", out, re.M)}


# The first test to use the fixture pays for training the demo's scorer (a few minutes on 2 cores).
@pytest.mark.timeout(2400)
@pytest.mark.slow
def test_small_demo_passes_its_self_check(small_demo):
    out, out_dir = small_demo
    checks = _checks(out)
    assert len(checks) >= 10
    assert {k: v for k, v in checks.items() if not v} == {}
    assert re.search(r"curate-tiny-synth-v\d+\.pt sha256 [0-9a-f]{64}", out)
    assert "calibrated (balanced) on 1000 held-out pairs" in out
    art = json.loads((out_dir / "work" / "global" / "clip_rank.json").read_text())
    assert art["rule"] == "calibrated" and art["calibration"]["heldout_recall"] >= 0.9


def test_self_check_fails_when_curation_does_not_work(pool: Path, tmp_path: Path):
    """The check can fail: a pipeline without a CLIP rule keeps every mismatched caption."""
    from curate.runner.pipeline import run_pipeline
    from tests.conftest import make_config, make_pipeline

    work = tmp_path / "w"
    assert run_pipeline(make_pipeline(("text", {})), make_config(str(pool / "*.tar"), work)).ok
    checks = {name: ok for name, ok, _ in self_check(work, pool / "ground_truth.parquet")}
    assert checks["mismatch removed >= 95%"] is False
    assert checks[f"every duplicate group keeps <= {Bounds().max_kept_per_duplicate_group} sample"] is False
    assert "curation did NOT work" in format_checks(self_check(work, pool / "ground_truth.parquet"))
    truth = pl.read_parquet(pool / "ground_truth.parquet")
    assert truth.filter(pl.col("label") == "mismatch").height > 0


def test_the_duplicate_check_reads_what_dedup_kept_not_what_balancing_left(pool: Path, tmp_path: Path):
    """decisions(until=STAGE) are the pipeline's decisions up to that stage: a later stage (balancing,
    here the image filter) cannot hide what an earlier one let through."""
    from curate.report.decisions import decisions
    from curate.runner.pipeline import run_pipeline
    from tests.conftest import make_config, make_pipeline

    work = tmp_path / "w"
    assert run_pipeline(make_pipeline(("text", {}), ("image", {"min_side": 200})), make_config(str(pool / "*.tar"), work)).ok
    upto_text, everything = decisions(work, until="text"), decisions(work)
    assert everything["kept"].sum() < upto_text["kept"].sum()
    assert set(upto_text.filter(pl.col("kept").not_())["dropped_by"].unique()) == {"text"}
    with pytest.raises(Exception, match="no stage 'dedup'"):
        decisions(work, until="dedup")
