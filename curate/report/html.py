"""`curate report WORK`: report/index.html + PNGs (matplotlib), no server needed.

Funnel and drops by reason come from the stats Parquet (the source of truth); distributions come
from the stage tables; the gallery decodes a few dropped images per reason into thumbnails.
"""
from __future__ import annotations

import html
import io
import logging
from pathlib import Path

import polars as pl

from curate.decisions import latest_run
from curate.io.layout import WorkDir
from curate.io.shards import iter_samples
from curate.stats import funnel, load_stats

log = logging.getLogger(__name__)
GALLERY_PER_REASON = 6


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


def _read_stage(work: WorkDir, stage: str, columns: list[str]) -> pl.DataFrame | None:
    files = sorted((work.root / stage).glob("*.parquet"))
    if not files:
        return None
    have = pl.read_parquet_schema(files[0])
    cols = [c for c in columns if c in have]
    return pl.read_parquet([str(f) for f in files], columns=cols) if cols else None


def plot_funnel(rows: list[dict], out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["stage"] for r in rows]
    ax.bar(names, [r["n_in"] for r in rows], color="#c8d6e5", label="in")
    ax.bar(names, [r["n_kept"] for r in rows], color="#2e86de", label="kept")
    ax.set_ylabel("samples")
    ax.set_title("Funnel (from stats Parquet)")
    ax.legend()
    return _save(fig, out / "funnel.png")


def plot_reasons(rows: list[dict], out: Path) -> str | None:
    items = [(f"{r['stage']}: {k}", v) for r in rows for k, v in r["dropped"].items()]
    if not items:
        return None
    items.sort(key=lambda kv: kv[1])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#ee5253")
    ax.set_xlabel("samples dropped")
    return _save(fig, out / "reasons.png")


def plot_hist(values: pl.Series, title: str, xlabel: str, out: Path, name: str,
              threshold: float | None = None, bins: int = 50, log: bool = False) -> str | None:
    v = values.drop_nulls().to_numpy()
    if v.size == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(v, bins=bins, color="#10ac84", log=log)
    if threshold is not None:
        ax.axvline(threshold, color="#ee5253", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _save(fig, out / name)


def plot_languages(langs: pl.Series, out: Path) -> str | None:
    vc = langs.drop_nulls().value_counts().sort("count", descending=True).head(15)
    if vc.is_empty():
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(vc[vc.columns[0]].to_list(), vc["count"].to_list(), color="#5f27cd")
    ax.set_yscale("log")
    ax.set_title("Caption languages (fastText lid.176, top 15)")
    return _save(fig, out / "languages.png")


def plot_sizes(df: pl.DataFrame, out: Path, min_side: float | None) -> str | None:
    d = df.drop_nulls(["img_width", "img_height"])
    if d.is_empty():
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(d["img_width"].to_numpy(), d["img_height"].to_numpy(), s=3, alpha=0.4)
    if min_side:
        ax.axvline(min_side, color="#ee5253", linestyle="--")
        ax.axhline(min_side, color="#ee5253", linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (original)")
    ax.set_ylabel("height (original)")
    ax.set_title("Image sizes")
    return _save(fig, out / "sizes.png")


def plot_concepts(cc: pl.DataFrame, out: Path) -> str | None:
    if cc.is_empty():
        return None
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for col, color in (("count_before", "#c8d6e5"), ("count_after", "#2e86de")):
        v = np.sort(cc[col].to_numpy())[::-1]
        v = v[v > 0]
        ax.plot(np.arange(1, len(v) + 1), v, color=color, label=col.replace("count_", ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concept rank")
    ax.set_ylabel("samples matching")
    ax.legend()
    return _save(fig, out / "concepts.png")


def gallery(work: WorkDir, run: dict, out: Path) -> dict[str, list[tuple[str, str]]]:
    """A few thumbnails of dropped samples per reason: {reason: [(png name, caption)]}."""
    from PIL import Image

    from curate.decisions import decisions

    d = decisions(work.root).filter(~pl.col("kept"))
    if d.is_empty():
        return {}
    picks = d.sort("uid").group_by("reason", maintain_order=True).head(GALLERY_PER_REASON)
    want = {(r["shard"], r["key"]): r["reason"] for r in picks.to_dicts()}
    paths = {Path(p).name.split(".")[0]: p for p in run["shards"]}
    gdir = out / "gallery"
    gdir.mkdir(exist_ok=True)
    result: dict[str, list[tuple[str, str]]] = {}
    for shard in sorted({s for s, _ in want}):
        for s in iter_samples(paths.get(shard, "")):
            reason = want.get((shard, s.key))
            if reason is None:
                continue
            name = f"{shard}_{s.key.replace('/', '_')}.png"
            try:
                with Image.open(io.BytesIO(s.image() or b"")) as im:
                    im.thumbnail((128, 128))
                    im.convert("RGB").save(gdir / name)
            except Exception:  # undecodable images are shown as a grey tile: that is their reason
                Image.new("RGB", (128, 128), (200, 200, 200)).save(gdir / name)
            cap = (s.caption_bytes() or b"").decode("utf-8", "replace")[:120]
            result.setdefault(reason or "?", []).append((f"gallery/{name}", cap))
    return result


def coverage_table(work: WorkDir) -> list[str]:
    """Share kept per reference concept (reference_filter with a labelled reference)."""
    from curate.stages.reference import concept_coverage

    cov = concept_coverage(work.root)
    if cov is None:
        return []
    h = ["<h2>Reference concepts</h2><p>Pool samples in the clusters nearest each labelled reference "
         "concept, and how many the whole pipeline kept.</p><table><tr><th>concept</th><th>reference "
         "samples</th><th>centroids</th><th>pool in clusters</th><th>kept</th><th>kept %</th>"
         "<th>% of all kept</th></tr>"]
    for r in cov.iter_rows(named=True):
        h.append(f"<tr><td style='text-align:left'>{html.escape(r['label'])}</td><td>{r['reference_samples']}</td>"
                 f"<td>{r['centroids']}</td><td>{r['pool_in_clusters']}</td><td>{r['kept']}</td>"
                 f"<td>{r['kept_pct_of_clusters']:.1f}</td><td>{r['pct_of_all_kept']:.1f}</td></tr>")
    return h + ["</table>"]


def write_report(workdir: str | Path) -> Path:
    work = WorkDir.at(workdir)
    out = work.root / "report"
    out.mkdir(exist_ok=True)
    run = latest_run(work.root)
    rows = funnel(work.root)
    params = {s["id"]: s["params"] for s in run["stages"]}
    figs: list[tuple[str, str | None]] = [("Funnel", plot_funnel(rows, out)),
                                          ("Dropped samples by reason", plot_reasons(rows, out))]
    text = _read_stage(work, "text", ["lang", "n_words"])
    if text is not None:
        figs.append(("Languages", plot_languages(text["lang"], out)))
        figs.append(("Caption length", plot_hist(text["n_words"], "Caption length", "words", out, "caption_words.png",
                                                 threshold=params.get("text", {}).get("min_words"), log=True)))
    img = _read_stage(work, "image", ["img_width", "img_height"])
    if img is not None:
        figs.append(("Image sizes", plot_sizes(img, out, params.get("image", {}).get("min_side"))))
    clip = _read_stage(work, "clip_score", ["clip_score"])
    if clip is not None:
        thr = None
        art = work.global_artifact("clip_rank", ".json")
        if art.exists():
            import json

            thr = json.loads(art.read_text()).get("threshold")
        figs.append(("CLIP score", plot_hist(clip["clip_score"], "CLIP score", "cosine similarity", out,
                                             "clip_score.png", threshold=thr)))
    cc_path = work.global_artifact("concept_counts")
    if cc_path.exists():
        figs.append(("Concepts: head and tail before/after balancing", plot_concepts(pl.read_parquet(cc_path), out)))
    gal = gallery(work, run, out)
    stats = load_stats(work.root)
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>curate report</title>",
         "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
         ".g{display:inline-block;width:140px;margin:4px;font-size:11px;vertical-align:top}</style></head><body>",
         f"<h1>curate report</h1><p>work dir <code>{html.escape(str(work.root))}</code>, run "
         f"<code>{html.escape(run['run_id'])}</code>, {stats['shard'].n_unique()} shard(s)</p>",
         "<h2>Funnel</h2><table><tr><th>stage</th><th>in</th><th>kept</th><th>kept %</th><th>dropped by reason</th></tr>"]
    for r in rows:
        pct = 100 * r["n_kept"] / r["n_in"] if r["n_in"] else 0
        reasons = ", ".join(f"{html.escape(k)}={v}" for k, v in r["dropped"].items()) or "-"
        h.append(f"<tr><td style='text-align:left'>{html.escape(r['stage'])}</td><td>{r['n_in']}</td>"
                 f"<td>{r['n_kept']}</td><td>{pct:.1f}</td><td style='text-align:left'>{reasons}</td></tr>")
    h.append("</table>")
    h += coverage_table(work)
    for title, name in figs:
        if name:
            h.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(name)}' alt='{html.escape(title)}'>")
    if gal:
        h.append("<h2>Dropped samples (a few per reason)</h2>")
        for reason, items in sorted(gal.items()):
            h.append(f"<h3>{html.escape(reason)}</h3>")
            for src, cap in items:
                h.append(f"<div class='g'><img src='{html.escape(src)}' alt=''><br>{html.escape(cap)}</div>")
    h.append("<p>Source of truth: <code>polars.read_parquet('WORK/stats/**/*.parquet')</code></p></body></html>")
    (out / "index.html").write_text("\n".join(h), encoding="utf-8")
    return out / "index.html"
