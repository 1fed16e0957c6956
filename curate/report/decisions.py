"""Join every stage's decision columns by uid: which samples survive, and why the others did not."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.core.config import ConfigError
from curate.io.layout import WorkDir
from curate.io.parquet import column_names, read_frame


def run_record(workdir: str | Path, run_id: str | None = None) -> dict:
    """The record of one run in a work dir (the latest by default): its pipeline's stages with
    their fingerprints, and its shards. Every read-back (stats, report, export) describes one run."""
    work = WorkDir.at(workdir)
    if not work.root.is_dir():
        raise ConfigError(f"{workdir}: work dir not found")
    try:
        run_id = run_id or json.loads((work.root / "runs" / "latest.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{workdir}: not a curate work dir (no runs/latest.json); give the folder that "
                          "`curate run` used as its work dir") from None
    try:
        return json.loads((work.run_dir(run_id) / "run.json").read_text())
    except (OSError, ValueError):
        known = sorted(p.name for p in (work.root / "runs").iterdir() if p.is_dir())
        raise ConfigError(f"{workdir}: no run {run_id!r} (runs: {', '.join(known) or 'none'})") from None


def latest_run(workdir: str | Path) -> dict:
    return run_record(workdir)


def filter_stage_ids(workdir: str | Path, run_id: str | None = None) -> list[str]:
    """Stages of the run (latest by default) that wrote decision columns, in pipeline order."""
    work = WorkDir.at(workdir)
    out = []
    for s in run_record(workdir, run_id)["stages"]:
        tables = sorted((work.root / s["id"]).glob("*.parquet"))
        if tables and f"keep_{s['id']}" in column_names(tables[0]):
            out.append(s["id"])
    return out


def decision_exprs(stage_ids: list[str]) -> list[pl.Expr]:
    """``kept`` (every filter said keep), ``dropped_by`` and ``reason`` (the earliest failing stage)
    from the keep_/reason_ columns of ``stage_ids`` (pipeline order); a null decision is a drop."""
    kept = pl.lit(True)
    for sid in stage_ids:
        kept = kept & pl.col(f"keep_{sid}").fill_null(False)
    dropped_by = pl.lit(None, dtype=pl.String)
    reason = pl.lit(None, dtype=pl.String)
    for sid in reversed(stage_ids):  # the earliest failing stage wins
        fail = pl.col(f"keep_{sid}") == False  # noqa: E712 (polars expression)
        dropped_by = pl.when(fail).then(pl.lit(sid)).otherwise(dropped_by)
        reason = pl.when(fail).then(pl.col(f"reason_{sid}")).otherwise(reason)
    return [kept.alias("kept"), dropped_by.alias("dropped_by"), reason.alias("reason")]


def decisions(workdir: str | Path, shard: str | None = None, run_id: str | None = None,
              until: str | None = None) -> pl.DataFrame:
    """uid, kept, dropped_by (first failing stage), reason: one row per sample of the pool, by the
    filters of one run (the latest by default); with ``until``, by its filters up to and including
    that stage id (what a later stage, such as balancing, was given)."""
    work = WorkDir.at(workdir)
    stage_ids = filter_stage_ids(workdir, run_id)
    if until is not None:
        order = [s["id"] for s in run_record(workdir, run_id)["stages"]]
        if until not in order:
            raise ConfigError(f"{workdir}: no stage {until!r} in run (stages: {', '.join(order)})")
        stage_ids = [s for s in stage_ids if order.index(s) <= order.index(until)]
    pattern = f"{shard}.parquet" if shard else "*.parquet"
    df = read_frame(work.root / "index" / pattern, columns=["uid", "shard", "key"])
    for sid in stage_ids:
        t = read_frame(work.root / sid / pattern, columns=["uid", f"keep_{sid}", f"reason_{sid}"])
        df = df.join(t, on="uid", how="left")
    return df.select("uid", "shard", "key", *decision_exprs(stage_ids))
