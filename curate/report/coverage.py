"""Reference-set coverage for the report: per reference label, how much of the pool the reference
filter's clusters hold and how much of it the whole pipeline kept."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl


def concept_coverage(workdir: str | Path, stage_id: str = "reference_filter") -> pl.DataFrame | None:
    """Per reference label: its reference samples and centroids, the pool samples assigned to
    those centroids, how many of them the whole pipeline kept, and their share of the kept set.
    None when the stage did not run or the reference had no labels. A centroid near two labels
    counts for both."""
    from curate.report.decisions import decisions
    from curate.io.layout import WorkDir
    from curate.io.parquet import read_frame

    work = WorkDir.at(workdir)
    art_path = work.global_dir() / f"{stage_id}.json"
    if not art_path.exists():
        return None
    art = json.loads(art_path.read_text())
    by_label = art.get("label_centroids")
    if not by_label:
        return None
    assigned = read_frame(work.stage_glob(stage_id), columns=["uid", "centroid"]).drop_nulls("centroid")
    final = decisions(work.root).select(["uid", "kept"])
    d = assigned.join(final, on="uid", how="left")
    n_kept = int(final["kept"].sum())
    rows = []
    for label, cents in sorted(by_label.items()):
        mine = d.filter(pl.col("centroid").is_in(cents))
        kept = int(mine["kept"].sum())
        rows.append({"label": label, "reference_samples": art["label_counts"][label], "centroids": len(cents),
                     "pool_in_clusters": mine.height, "kept": kept,
                     "kept_pct_of_clusters": 100 * kept / mine.height if mine.height else 0.0,
                     "pct_of_all_kept": 100 * kept / n_kept if n_kept else 0.0})
    return pl.DataFrame(rows)
