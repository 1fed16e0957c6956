"""Totals read back from the per-shard stats Parquet (never summed in memory during a run)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from curate.io.layout import WorkDir


def load_stats(workdir: str | Path) -> pl.DataFrame:
    """All stats rows of a work dir: run_id, stage, shard, metric, value."""
    work = WorkDir.at(workdir)
    if not (work.root / "stats").exists():
        return pl.DataFrame(schema={"run_id": pl.String, "stage": pl.String, "shard": pl.String,
                                    "metric": pl.String, "value": pl.Float64})
    return pl.read_parquet(work.stats_glob())


def stage_order(workdir: str | Path) -> list[str]:
    """Stage ids in the order of the latest run's pipeline."""
    from curate.decisions import latest_run

    try:
        return [s["id"] for s in latest_run(workdir)["stages"]]
    except (OSError, ValueError, KeyError):
        return []


def funnel(workdir: str | Path) -> list[dict[str, Any]]:
    """Per stage: shards, in, kept, dropped by reason, seconds: the pipeline's funnel."""
    df = load_stats(workdir)
    if df.is_empty():
        return []
    order = stage_order(workdir)
    stages = sorted(df["stage"].unique().to_list(),
                    key=lambda s: (order.index(s) if s in order else len(order), s))
    rows = []
    for st in stages:
        d = df.filter(pl.col("stage") == st)
        sums = dict(d.group_by("metric").agg(pl.col("value").sum()).iter_rows())
        dropped = {m.split(":", 1)[1]: int(v) for m, v in sums.items() if m.startswith("dropped:")}
        rows.append({
            "stage": st,
            "shards": d["shard"].n_unique(),
            "n_in": int(sums.get("n_in", 0)),
            "n_kept": int(sums.get("n_kept", 0)),
            "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
            "seconds": round(float(sums.get("seconds", 0.0)), 3),
            "damaged_shards": int(sums.get("shard_error", 0)),
        })
    return rows


def format_funnel(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no stats yet"
    lines = [f"{'stage':<18}{'shards':>7}{'in':>10}{'kept':>10}{'kept %':>8}  dropped by reason"]
    for r in rows:
        pct = 100.0 * r["n_kept"] / r["n_in"] if r["n_in"] else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in r["dropped"].items()) or "-"
        lines.append(f"{r['stage']:<18}{r['shards']:>7}{r['n_in']:>10}{r['n_kept']:>10}{pct:>7.1f}%  {reasons}")
        if r["damaged_shards"]:
            lines.append(f"{'':<18}{r['damaged_shards']} damaged shard(s): readable prefix processed")
    return "\n".join(lines)


def global_summaries(workdir: str | Path) -> dict[str, Any]:
    """What each global stage decided (thresholds, groups, concept head/tail), from WORK/global."""
    work = WorkDir.at(workdir)
    out: dict[str, Any] = {}
    for p in sorted(work.global_dir().glob("*.json")) if work.global_dir().exists() else []:
        if p.name.endswith(".done.json"):
            continue
        try:
            out[p.stem] = json.loads(p.read_text())
        except ValueError:
            continue
    return out


def format_globals(summ: dict[str, Any]) -> str:
    lines = []
    for name, s in summ.items():
        if name == "clip_rank":
            lines.append(f"clip_rank: threshold {s.get('threshold')} over {s.get('n')} scores "
                         f"({'exact' if s.get('exact') else 'approximate'}, rule {s.get('rule')})")
        elif name == "dedup":
            lines.append(f"dedup: {s.get('groups')} duplicate groups, edges {s.get('edges')}, dropped {s.get('dropped')}")
        elif name == "balance":
            ht = s.get("head_tail", {})
            lines.append(f"balance: t={s.get('t'):.4g}, kept {s.get('kept')} of {s.get('samples')}; "
                         f"top 1% of concepts hold {ht.get('top1pct_share_before', 0):.1%} of matches before, "
                         f"{ht.get('top1pct_share_after', 0):.1%} after; concepts present "
                         f"{ht.get('concepts_present_before')} -> {ht.get('concepts_present_after')}")
        else:
            lines.append(f"{name}: {json.dumps(s)[:200]}")
    return "\n".join(lines)
