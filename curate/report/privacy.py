"""The report's privacy section, for a run whose stages found faces (``face_bboxes``) or personal
data in captions (``pii_kinds``): how many images show how many faces, a few of them blurred as
``export --blur-faces`` writes them, and the kinds of personal data found with a few captions as
``export --redact-pii`` writes them. Every thumbnail and caption the report shows of a sample the
privacy stages looked at is blurred and redacted (the privacy recipe looks at every row)."""
from __future__ import annotations

import html
import io
from pathlib import Path

import polars as pl

from curate.io.layout import WorkDir
from curate.io.parquet import read_frame
from curate.io.shards import iter_samples, shard_name

SHOWN = 6


def _stage_with(run: dict, column: str) -> str | None:
    return next((st["id"] for st in run["stages"] if column in st.get("columns", [])), None)


def _table(work: WorkDir, stage: str, columns: list[str]) -> pl.DataFrame:
    files = sorted((work.root / stage).glob("*.parquet"))
    index = read_frame([str(f) for f in sorted((work.root / "index").glob("*.parquet"))],
                       columns=["uid", "shard", "key", "caption"])
    return read_frame([str(f) for f in files], columns=["uid", *columns]).join(index, on="uid", how="left")


def _faces(work: WorkDir, run: dict, stage: str, out: Path) -> list[str]:
    from PIL import Image

    from curate.algorithms.face_blur import blur_faces

    t = _table(work, stage, ["face_bboxes", "face_count"]).filter(pl.col("face_count").is_not_null())
    bins = t.select(
        (pl.col("face_count") == 0).sum().alias("none"), (pl.col("face_count") == 1).sum().alias("one"),
        pl.col("face_count").is_between(2, 5).sum().alias("two to five"), (pl.col("face_count") > 5).sum().alias("more"))
    h = [f"<h2>Faces</h2><p>{t['face_count'].sum()} face(s) in {int((t['face_count'] > 0).sum())} of {t.height} "
         f"image(s) looked at (stage <code>{html.escape(stage)}</code>). A few, blurred as "
         "<code>curate export --blur-faces</code> writes them:</p>",
         "<table><tr><th>faces per image</th>" + "".join(f"<th>{c}</th>" for c in bins.columns) + "</tr><tr><td>images</td>"
         + "".join(f"<td>{v}</td>" for v in bins.row(0)) + "</tr></table>"]
    picks = t.filter(pl.col("face_count") > 0).sort("uid").head(SHOWN)
    paths = {shard_name(p): p for p in run["shards"]}
    want = {(r["shard"], r["key"]): r for r in picks.to_dicts()}
    gdir = out / "gallery"
    gdir.mkdir(exist_ok=True)
    for shard in sorted({s for s, _ in want}):
        for s in iter_samples(paths.get(shard, "")):
            row = want.get((shard, s.key))
            if row is None or not s.image():
                continue
            data, _ = blur_faces(s.image() or b"", s.image_ext() or "jpg", row["face_bboxes"])
            name = f"blurred_{shard}_{s.key.replace('/', '_')}.png"
            with Image.open(io.BytesIO(data)) as im:
                im.thumbnail((160, 160))
                im.convert("RGB").save(gdir / name)
            h.append(f"<div class='g'><img src='gallery/{html.escape(name)}' alt=''><br>"
                     f"<span class='d'>{row['face_count']} face(s), uid {row['uid'][:12]}</span></div>")
    return h


def _pii(work: WorkDir, stage: str) -> list[str]:
    from curate.algorithms.pii import redact

    t = _table(work, stage, ["pii_kinds", "pii_spans"]).filter(pl.col("pii_kinds").is_not_null())
    found = t.filter(pl.col("pii_kinds").list.len() > 0)
    counts = found.select(pl.col("pii_kinds").explode().value_counts(sort=True)).unnest("pii_kinds")
    h = [f"<h2>Personal data in captions</h2><p>{found.height} of {t.height} caption(s) hold personal data "
         f"(stage <code>{html.escape(stage)}</code>); as <code>curate export --redact-pii</code> writes them:</p>",
         "<table><tr><th>kind</th><th>captions</th></tr>"
         + "".join(f"<tr><td>{html.escape(k)}</td><td>{n}</td></tr>" for k, n in counts.iter_rows()) + "</table><ul>"]
    for r in found.sort("uid").head(SHOWN).to_dicts():
        h.append(f"<li>{html.escape(redact(r['caption'] or '', r['pii_spans'])[:160])}</li>")
    return h + ["</ul>"]


def masked(work: WorkDir, run: dict, uids: set[str]) -> dict[str, tuple[list | None, list | None]]:
    """uid -> (face boxes, caption PII spans) for ``uids``, from the run's privacy stages (empty
    when it ran neither): the report blurs and redacts every sample it shows with them."""
    out: dict[str, tuple[list | None, list | None]] = {}
    for column, at in (("face_bboxes", 0), ("pii_spans", 1)):
        stage = _stage_with(run, column)
        if not stage or not (work.root / stage).is_dir():
            continue
        files = [str(f) for f in sorted((work.root / stage).glob("*.parquet"))]
        t = read_frame(files, columns=["uid", column]).filter(pl.col("uid").is_in(sorted(uids)))
        for uid, v in zip(t["uid"].to_list(), t[column].to_list()):
            pair = list(out.get(uid, (None, None)))
            pair[at] = v
            out[uid] = (pair[0], pair[1])
    return out


def privacy_section(work: WorkDir, run: dict, out: Path) -> list[str]:
    """HTML for the faces and caption PII the run found (nothing when it ran neither stage)."""
    h: list[str] = []
    faces = _stage_with(run, "face_bboxes")
    if faces and (work.root / faces).is_dir():
        h += _faces(work, run, faces, out)
    pii = _stage_with(run, "pii_kinds")
    if pii and (work.root / pii).is_dir():
        h += _pii(work, pii)
    return h
