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

from curate.report.decisions import run_record
from curate.core.config import ConfigError
from curate.io.layout import WorkDir
from curate.io.parquet import column_names, read_frame
from curate.io.shards import iter_samples
from curate.algorithms.face_blur import blur_faces
from curate.algorithms.pii import redact
from curate.report.privacy import masked, privacy_section
from curate.report.stats import funnel

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
    have = column_names(files[0])
    cols = [c for c in columns if c in have]
    return read_frame(files, columns=cols) if cols else None


def funnel_figure(rows: list[dict]):
    """Samples in and kept per stage, one horizontal bar per stage (pipeline order, top down), so
    stage ids of any length stay readable."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["stage"] for r in rows][::-1]
    ax.barh(names, [r["n_in"] for r in rows][::-1], color="#c8d6e5", label="in")
    ax.barh(names, [r["n_kept"] for r in rows][::-1], color="#2e86de", label="kept")
    ax.set_xlabel("samples")
    ax.set_title("Funnel (from stats Parquet)")
    ax.legend(loc="lower right")
    return fig


def plot_funnel(rows: list[dict], out: Path) -> str:
    return _save(funnel_figure(rows), out / "funnel.png")


def reason_label(stage: str, reason: str) -> str:
    """``stage: reason``, without the stage twice when the reason already starts with it (image:aspect)."""
    return reason if reason.startswith(f"{stage}:") else f"{stage}: {reason}"


def plot_reasons(rows: list[dict], out: Path) -> str | None:
    items = [(reason_label(r["stage"], k), v) for r in rows for k, v in r["dropped"].items()]
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
    for col, style in (("count_before", dict(color="#8395a7", linewidth=3.5)),
                       ("count_after", dict(color="#2e86de", linewidth=1.5, linestyle="--"))):
        v = np.sort(cc[col].to_numpy())[::-1]
        v = v[v > 0]
        ax.plot(np.arange(1, len(v) + 1), v, label=col.replace("count_", ""), **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concept rank")
    ax.set_ylabel("samples matching")
    ax.legend()
    return _save(fig, out / "concepts.png")


def _classifier_ids(run: dict) -> list[str]:
    return [s["id"] for s in run["stages"] if s["name"] == "classifier"]


def _tile_details(work: WorkDir, run: dict) -> pl.DataFrame:
    """uid, kept, reason, clip_score, dup_of and the predicted classes (where those stages ran)
    for every sample."""
    from curate.report.decisions import decisions

    d = decisions(work.root, run_id=run["run_id"])
    sources = [("clip_score", "clip_score"), ("dedup", "dup_of")] + [(c, "cls_labels") for c in _classifier_ids(run)[:1]]
    for stage, col in sources:
        t = _read_stage(work, stage, ["uid", col])
        if t is not None and col in t.columns and stage in {s["id"] for s in run["stages"]}:
            d = d.join(t, on="uid", how="left")
    return d


def classifier_tables(work: WorkDir, run: dict, top: int = 20) -> list[str]:
    """Per classifier stage: how many pairs each predicted (top-1) class covers and the share the
    whole pipeline kept, for the most frequent classes."""
    from curate.report.decisions import decisions

    h: list[str] = []
    kept = decisions(work.root, run_id=run["run_id"]).select("uid", "kept")
    for sid in _classifier_ids(run):
        t = _read_stage(work, sid, ["uid", "cls_labels", "cls_decision"])
        if t is None:
            continue
        per = (t.filter(pl.col("cls_labels").is_not_null())
               .with_columns(pl.col("cls_labels").list.first().alias("cls"))
               .join(kept, on="uid", how="left")
               .group_by("cls").agg(pl.len().alias("n"), pl.col("kept").sum().alias("kept"),
                                    (pl.col("cls_decision") == "mismatch").sum().alias("mismatch"))
               .sort(["n", "cls"], descending=[True, False]))
        h.append(f"<h2>Classifier {html.escape(sid)}: predicted classes</h2><p>Pairs per top-1 class, how "
                 f"many the caption did not confirm, and how many the pipeline kept ({per.height} classes; "
                 f"the {min(top, per.height)} most frequent):</p><table><tr><th>class</th><th>pairs</th>"
                 "<th>caption mismatch</th><th>kept</th><th>kept %</th></tr>")
        for r in per.head(top).iter_rows(named=True):
            h.append(f"<tr><td class='l'>{html.escape(r['cls'])}</td><td>{r['n']}</td><td>{r['mismatch']}</td>"
                     f"<td>{r['kept']}</td><td>{100 * r['kept'] / r['n']:.1f}</td></tr>")
        h.append("</table>")
    return h


def gallery(work: WorkDir, run: dict, out: Path) -> dict[str, list[tuple[str, str, str]]]:
    """Thumbnails of a few kept samples and of a few dropped samples per reason:
    {"kept" or reason: [(png name, caption, detail line)]}; the detail names the uid, the CLIP score
    and, for a duplicate, the uid it duplicates."""
    from PIL import Image

    d = _tile_details(work, run).with_columns(pl.when(pl.col("kept")).then(pl.lit("kept"))
                                               .otherwise(pl.col("reason").fill_null("?")).alias("group"))
    if d.is_empty():
        return {}
    picks = d.sort("uid").group_by("group", maintain_order=True).head(GALLERY_PER_REASON)
    want = {(r["shard"], r["key"]): r for r in picks.to_dicts()}
    paths = {Path(p).name.split(".")[0]: p for p in run["shards"]}
    gdir = out / "gallery"
    gdir.mkdir(exist_ok=True)
    private = masked(work, run, {r["uid"] for r in want.values()})
    result: dict[str, list[tuple[str, str, str]]] = {}
    for shard in sorted({s for s, _ in want}):
        for s in iter_samples(paths.get(shard, "")):
            row = want.get((shard, s.key))
            if row is None:
                continue
            name = f"{shard}_{s.key.replace('/', '_')}.png"
            boxes, spans = private.get(row["uid"], (None, None))
            try:
                data = blur_faces(s.image() or b"", s.image_ext() or "jpg", boxes)[0] if boxes else s.image()
                with Image.open(io.BytesIO(data or b"")) as im:
                    im.thumbnail((128, 128))
                    im.convert("RGB").save(gdir / name)
            except Exception:  # undecodable images are shown as a grey tile: that is their reason
                Image.new("RGB", (128, 128), (200, 200, 200)).save(gdir / name)
            cap = (s.caption_bytes() or b"").decode("utf-8", "replace")
            cap = (redact(cap, spans) if spans else cap)[:120]
            detail = [f"uid {row['uid'][:12]}"]
            if row.get("clip_score") is not None:
                detail.append(f"CLIP {row['clip_score']:.3f}")
            if row.get("dup_of"):
                detail.append(f"duplicate of {row['dup_of'][:12]}")
            if row.get("cls_labels"):
                detail.append(f"classes: {', '.join(row['cls_labels'][:3])}")
            if not row["kept"]:
                detail.append(f"{row['dropped_by']}: {row['reason']}")
            result.setdefault(row["group"], []).append((f"gallery/{name}", cap, ", ".join(detail)))
    return result


def coverage_table(work: WorkDir) -> list[str]:
    """Share kept per reference concept (reference_filter with a labelled reference)."""
    from curate.report.coverage import concept_coverage

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


CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
       ".l{text-align:left}.g{display:inline-block;width:140px;margin:4px;font-size:11px;vertical-align:top}"
       ".d{color:#555}")
# Counts images that failed to load into <body data-broken>: a headless browser test reads it.
CHECK_IMAGES = ("<script>window.addEventListener('load',function(){var b=0;for(const i of document.images)"
                "{if(!i.complete||i.naturalWidth===0)b++;}document.body.dataset.broken=b;"
                "document.body.dataset.images=document.images.length;});</script>")


def _funnel_table(rows: list[dict]) -> list[str]:
    h = ["<table><tr><th>stage</th><th>shards</th><th>in</th><th>kept</th><th>kept %</th><th>seconds</th>"
         "<th>dropped by reason</th></tr>"]
    for r in rows:
        pct = 100 * r["n_kept"] / r["n_in"] if r["n_in"] else 0
        reasons = ", ".join(f"{html.escape(k)}={v}" for k, v in r["dropped"].items()) or "-"
        h.append(f"<tr><td class='l'>{html.escape(r['stage'])}</td><td>{r['shards']}/{r['shards_total']}</td>"
                 f"<td>{r['n_in']}</td><td>{r['n_kept']}</td><td>{pct:.1f}</td><td>{r['seconds']:.1f}</td>"
                 f"<td class='l'>{reasons}</td></tr>")
    return h + ["</table>"]


def _ingest_note(work: WorkDir) -> list[str]:
    """What `curate ingest --from` this work dir saved: samples dropped before any download."""
    import json

    path = work.root / "ingest.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    return [f"<p>Filtered before download (<code>curate ingest --from</code>): {r['dropped_before_download']} of "
            f"{r['pool']} samples dropped on metadata, {r['kept_by_metadata_run']} downloaded into "
            f"<code>{html.escape(r['out'])}</code>; about {r['bytes_not_downloaded_estimate'] / 1e6:.1f} MB not "
            f"fetched ({r['bytes_downloaded'] / 1e6:.1f} MB fetched).</p>"]


def _params_table(run: dict) -> list[str]:
    import json

    h = ["<h2>Stages and parameters</h2><table><tr><th>stage</th><th>kind</th><th>parameters</th>"
         "<th>fingerprint</th></tr>"]
    for st in run["stages"]:
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in st["params"].items())
        h.append(f"<tr><td class='l'>{html.escape(st['id'])}</td><td class='l'>{html.escape(st['kind'])}</td>"
                 f"<td class='l'><code>{html.escape(params)}</code></td><td><code>{st['fingerprint']}</code></td></tr>")
    return h + ["</table>"]


def _concept_table(cc: pl.DataFrame, top: int = 15) -> list[str]:
    head = cc.sort(["count_before", "entry"], descending=[True, False]).head(top)
    h = [f"<p>The {top} most frequent concepts, before and after balancing:</p><table><tr><th>concept</th>"
         "<th>before</th><th>after</th><th>keep probability</th></tr>"]
    for r in head.iter_rows(named=True):
        h.append(f"<tr><td class='l'>{html.escape(r['entry'])}</td><td>{r['count_before']}</td>"
                 f"<td>{r['count_after']}</td><td>{r['p_entry']:.3f}</td></tr>")
    return h + ["</table>"]


def write_report(workdir: str | Path, run_id: str | None = None, out: Path | None = None) -> Path:
    """WORK/report/index.html, or ``out``/index.html (required for a work dir on object storage:
    a report is opened from a local folder)."""
    work = WorkDir.at(workdir)
    run = run_record(work.root, run_id)
    if out is None and work.remote:
        raise ConfigError(f"{workdir} is on object storage: pass --out LOCAL_FOLDER for the report")
    out = Path(out) if out is not None else work.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = funnel(work.root, run["run_id"])
    params = {s["id"]: s["params"] for s in run["stages"]}
    figs: list[tuple[str, str | None, list[str]]] = [("Dropped samples by reason", plot_reasons(rows, out), []),
                                                     ("Funnel (plot)", plot_funnel(rows, out), [])]
    text = _read_stage(work, "text", ["lang", "n_words"]) if "text" in params else None
    if text is not None:
        figs.append(("Languages", plot_languages(text["lang"], out), []))
        figs.append(("Caption length", plot_hist(text["n_words"], "Caption length", "words", out, "caption_words.png",
                                                 threshold=params.get("text", {}).get("min_words"), log=True), []))
    img = _read_stage(work, "image", ["img_width", "img_height"]) if "image" in params else None
    if img is not None:
        figs.append(("Image sizes", plot_sizes(img, out, params.get("image", {}).get("min_side")), []))
    clip = _read_stage(work, "clip_score", ["clip_score"]) if "clip_score" in params else None
    if clip is not None:
        thr = None
        art = work.global_artifact("clip_rank", ".json")
        if art.exists() and "clip_rank" in params:
            import json

            thr = json.loads(art.read_text()).get("threshold")
        figs.append(("CLIP score", plot_hist(clip["clip_score"], "CLIP score", "cosine similarity", out,
                                             "clip_score.png", threshold=thr), []))
    cc_path = work.global_artifact("concept_counts")
    if cc_path.exists() and "balance" in params:
        cc = read_frame(cc_path)
        figs.append(("Concepts: head and tail before/after balancing", plot_concepts(cc, out), _concept_table(cc)))
    gal = gallery(work, run, out)
    total = sum(r["seconds"] for r in rows)
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>curate report</title>",
         f"<style>{CSS}</style>{CHECK_IMAGES}</head><body>",
         f"<h1>curate report</h1><p>work dir <code>{html.escape(str(work.root))}</code>, run "
         f"<code>{html.escape(run['run_id'])}</code>, {len(run['shards'])} shard(s), "
         f"{total:.1f} s of stage time</p>", "<h2>Funnel</h2>"]
    h += _funnel_table(rows)
    h += _ingest_note(work)
    h += _params_table(run)
    h += coverage_table(work)
    h += classifier_tables(work, run)
    h += privacy_section(work, run, out)
    for title, name, extra in figs:
        if name:
            h.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(name)}' alt='{html.escape(title)}'>")
            h += extra
    for group, title in (("kept", "Kept samples (a few)"), (None, "Dropped samples (a few per reason)")):
        items = [(g, v) for g, v in sorted(gal.items()) if (g == "kept") == (group == "kept")]
        if not items:
            continue
        h.append(f"<h2>{title}</h2>")
        for g, tiles in items:
            if g != "kept":
                h.append(f"<h3>{html.escape(g)}</h3>")
            for src, cap, detail in tiles:
                h.append(f"<div class='g'><img src='{html.escape(src)}' alt=''><br>{html.escape(cap)}"
                         f"<br><span class='d'>{html.escape(detail)}</span></div>")
    h.append("<p>Source of truth: <code>polars.read_parquet('WORK/stats/**/*.parquet')</code></p></body></html>")
    (out / "index.html").write_text("\n".join(h), encoding="utf-8")
    return out / "index.html"


def write_comparison(work_a: str | Path, work_b: str | Path, out: Path | None = None) -> Path:
    """Two runs side by side (``curate report A B``): each funnel, and how their kept sets overlap.
    Written to ``A/report/compare.html`` (or ``out``/compare.html)."""
    from curate.report.decisions import decisions

    a, b = WorkDir.at(work_a), WorkDir.at(work_b)
    if out is None and a.remote:
        raise ConfigError(f"{work_a} is on object storage: pass --out LOCAL_FOLDER for the report")
    runs = [run_record(w.root) for w in (a, b)]
    kept = [set(decisions(w.root).filter(pl.col("kept"))["uid"].to_list()) for w in (a, b)]
    both, union = len(kept[0] & kept[1]), len(kept[0] | kept[1])
    out = Path(out) if out is not None else a.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>curate: two runs</title>",
         f"<style>{CSS}</style>{CHECK_IMAGES}</head><body><h1>Two runs side by side</h1>",
         "<table><tr><th></th><th>A</th><th>B</th></tr>",
         f"<tr><td class='l'>work dir</td><td class='l'><code>{html.escape(str(a.root))}</code></td>"
         f"<td class='l'><code>{html.escape(str(b.root))}</code></td></tr>",
         f"<tr><td class='l'>run</td><td>{runs[0]['run_id']}</td><td>{runs[1]['run_id']}</td></tr>",
         f"<tr><td class='l'>stages</td><td class='l'>{', '.join(s['id'] for s in runs[0]['stages'])}</td>"
         f"<td class='l'>{', '.join(s['id'] for s in runs[1]['stages'])}</td></tr>",
         f"<tr><td class='l'>kept</td><td>{len(kept[0])}</td><td>{len(kept[1])}</td></tr>",
         f"<tr><td class='l'>kept by both</td><td colspan=2>{both} (Jaccard {both / union if union else 1:.3f}); "
         f"only A {len(kept[0] - kept[1])}, only B {len(kept[1] - kept[0])}</td></tr></table>"]
    for name, w, run in (("A", a, runs[0]), ("B", b, runs[1])):
        h.append(f"<h2>Funnel {name}</h2>")
        h += _funnel_table(funnel(w.root, run["run_id"]))
    h.append("</body></html>")
    (out / "compare.html").write_text("\n".join(h), encoding="utf-8")
    return out / "compare.html"
