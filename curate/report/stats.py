"""Totals read back from the per-shard stats Parquet (never summed in memory during a run)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from curate.core.config import ConfigError
from curate.io.layout import WorkDir
from curate.io.parquet import read_frame, read_meta


def load_stats(workdir: str | Path) -> pl.DataFrame:
    """All stats rows of a work dir: run_id, stage, shard, metric, value."""
    work = WorkDir.at(workdir)
    if not (work.root / "stats").exists():
        return load_stats_empty()
    return read_frame(work.stats_glob())


def stage_order(workdir: str | Path, run_id: str | None = None) -> list[str]:
    """Stage ids in the order of the run's pipeline (the latest run by default)."""
    from curate.report.decisions import run_record

    try:
        return [s["id"] for s in run_record(workdir, run_id)["stages"]]
    except ConfigError:
        return []


def funnel(workdir: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """Per stage of one run (the latest by default): shards done, in, kept, dropped by reason,
    seconds. Only stats files made with that run's fingerprints count, so a work dir that held
    another pipeline (or other parameters) before shows this run's funnel alone."""
    from curate.report.decisions import run_record
    from curate.io.shards import shard_name

    run = run_record(workdir, run_id)
    work = WorkDir.at(workdir)
    shards = [shard_name(p) for p in run["shards"]]
    rows = []
    for st in run["stages"]:
        paths = [work.stage_stats(st["id"], s) for s in shards]
        done = [p for p in paths if (read_meta(p) or {}).get("fingerprint") == st["fingerprint"]]
        d = read_frame(done) if done else load_stats_empty()
        sums = dict(d.group_by("metric").agg(pl.col("value").sum()).iter_rows())
        dropped = {m.split(":", 1)[1]: int(v) for m, v in sums.items() if m.startswith("dropped:")}
        rows.append({
            "stage": st["id"],
            "shards": len(done),
            "shards_total": len(shards),
            "complete": len(done) == len(shards),
            "n_in": int(sums.get("n_in", 0)),
            "n_kept": int(sums.get("n_kept", 0)),
            "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
            "seconds": round(float(sums.get("seconds", 0.0) + sums.get("summarize_seconds", 0.0))
                             + _combine_seconds(work, st), 3),
            "damaged_shards": int(sums.get("shard_error", 0)),
        })
    return rows


def _combine_seconds(work: WorkDir, stage: dict[str, Any]) -> float:
    """Seconds of a global stage's combine step, from its done marker (0 for a map stage)."""
    from curate.runner.execute import global_marker

    if stage.get("kind") != "global":
        return 0.0
    try:
        marker = json.loads(global_marker(work, stage["id"]).read_text())
    except (OSError, ValueError):
        return 0.0
    return float(marker.get("seconds", 0.0)) if marker.get("fingerprint") == stage["fingerprint"] else 0.0


def stale_stages(workdir: str | Path, run_id: str | None = None) -> list[str]:
    """Stage tables in the work dir that the run's pipeline does not have (left by other runs)."""
    work = WorkDir.at(workdir)
    mine = set(stage_order(workdir, run_id))
    stats = work.root / "stats"
    return sorted(p.name for p in stats.iterdir() if p.is_dir() and p.name not in mine) if stats.exists() else []


def load_stats_empty() -> pl.DataFrame:
    return pl.DataFrame(schema={"run_id": pl.String, "stage": pl.String, "shard": pl.String,
                                "metric": pl.String, "value": pl.Float64, "detail": pl.String})


def format_funnel(rows: list[dict[str, Any]], stale: list[str] | None = None) -> str:
    if not rows:
        return "no stats yet"
    lines = [f"{'stage':<18}{'shards':>11}{'in':>10}{'kept':>10}{'kept %':>8}{'seconds':>9}  dropped by reason"]
    for r in rows:
        pct = 100.0 * r["n_kept"] / r["n_in"] if r["n_in"] else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in r["dropped"].items()) or "-"
        shards = f"{r['shards']}/{r['shards_total']}"
        lines.append(f"{r['stage']:<18}{shards:>11}{r['n_in']:>10}{r['n_kept']:>10}{pct:>7.1f}%"
                     f"{r['seconds']:>9.1f}  {reasons}")
        if r["damaged_shards"]:
            lines.append(f"{'':<18}{r['damaged_shards']} damaged shard(s): readable prefix processed")
    first, last = rows[0], rows[-1]
    total = 100.0 * last["n_kept"] / first["n_in"] if first["n_in"] else 0.0
    lines.append(f"overall: kept {last['n_kept']} of {first['n_in']} samples ({total:.1f}%), "
                 f"{sum(r['seconds'] for r in rows):.1f} s of stage time")
    todo = [r["stage"] for r in rows if not r["complete"]]
    if todo:
        lines.append(f"INCOMPLETE: stage(s) {', '.join(todo)} not done on every shard; rerun the same "
                     "command to finish (the totals above cover the done shards)")
    if stale:
        lines.append(f"stale (other runs, not in this run's pipeline, ignored): {', '.join(stale)}")
    return "\n".join(lines)


def global_summaries(workdir: str | Path, run_id: str | None = None) -> dict[str, Any]:
    """What each global stage of the run decided (thresholds, groups, concept head/tail): the
    summary its combine step stored with its done marker, by stage id."""
    from curate.report.decisions import run_record
    from curate.runner.execute import global_marker

    work = WorkDir.at(workdir)
    out: dict[str, Any] = {}
    for st in run_record(workdir, run_id)["stages"]:
        if st["kind"] != "global":
            continue
        try:
            marker = json.loads(global_marker(work, st["id"]).read_text())
        except (OSError, ValueError):
            continue
        if marker.get("fingerprint") == st["fingerprint"]:
            out[st["id"]] = marker["summary"]
    return out


def format_globals(summ: dict[str, Any], workdir: str | Path, run_id: str | None = None) -> str:
    """Each global stage formats its own summary (``Stage.format_summary``)."""
    from curate.core.config import StageSpec
    from curate.report.decisions import run_record
    from curate.runner.registry import build_stage

    specs = {s["id"]: s for s in run_record(workdir, run_id)["stages"]}
    lines: list[str] = []
    for sid, summary in summ.items():
        spec = specs[sid]
        stage = build_stage(StageSpec(name=spec["name"], id=sid, params=spec["params"]))
        lines += stage.format_summary(summary)
    return "\n".join(lines)
