"""Outputs ready for pretraining, from a finished work dir.

1. per input shard (map): join every stage table by uid, keep the survivors, write
   ``OUT/metadata/<shard>.parquet`` (and ``OUT/pool/<shard>.parquet`` with every row and why it
   was dropped); return the kept count.
2. driver: prefix sums of the counts give every kept sample a global index, so output shard ``j``
   holds indices ``[j*S, (j+1)*S)`` whatever the number of workers.
3. per output shard (map): copy the original member bytes of its samples into ``OUT/shards/j.tar``.
Then ``uids.npy`` (DataComp's subset format), ``sizes.json`` and ``manifest.json``.

Privacy (``--blur-faces``, ``--redact-pii``): the images of the output shards have the faces of
``face_bboxes`` blurred (other images keep their bytes), and every caption written (metadata, pool,
the shards' ``.txt`` and ``.json``) has the spans of ``pii_spans`` replaced by their tag; the
manifest says which detector, threshold and blur were used.

Shuffling (optional, seeded) permutes the order of input shards and the samples inside each one
(the shard-level + in-shard shuffle of webdataset loaders): a global shuffle of a 10B-sample pool
would make every output shard read every input tar.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate.report.decisions import decision_exprs, run_record
from curate.engine import Executor
from curate.io.layout import WorkDir
from curate.io.parquet import (RefusedOutput, WorkDirError, atomic_path, atomic_write_bytes, read_meta, read_table,
                               write_table)
from curate.io.shards import is_metadata_shard, iter_samples, shard_name
from curate.io import storage
from curate.io.storage import call_with_options, is_url, set_storage_options, work_path

log = logging.getLogger(__name__)
ROW_GROUP = 16_384
_SKIP_COLUMNS = ("image_emb", "text_emb")  # large vectors stay in the work dir


MARKER = ".curate-export.json"  # written by export into every folder it owns


@dataclass(frozen=True)
class ExportSpec:
    shard_size: int = 10_000
    shuffle_seed: int | None = None
    write_pool: bool = True
    hf_parquet: bool = False
    overwrite: bool = False  # replace an earlier export (a folder holding MARKER), atomically
    run_id: str | None = None  # which run of the work dir (default: the latest)
    schema: str = "curate"  # or "datacomp": DataComp's metadata column names (datacomp_names)
    blur_faces: bool = False  # blur the faces stage's face_bboxes in the output shards' images
    redact_pii: bool = False  # captions with caption_pii's spans replaced by <EMAIL>, <PHONE>...
    caption: str = "original"  # .txt: the alt-text, the recaption stage's caption, or both (KEY.synthetic.txt)


# DataComp names its CLIP-score columns by the scoring model.
DATACOMP_SCORE = {"ViT-B-32": "clip_b32_similarity_score", "ViT-L-14": "clip_l14_similarity_score"}


def datacomp_names(run: dict) -> dict[str, str]:
    """curate column -> DataComp metadata column (``text``, ``clip_l14_similarity_score``...).
    ``uid``, ``url``, ``sha256``, ``original_width`` and ``original_height`` already match."""
    names = {"caption": "text"}
    models = [s["params"].get("model") for s in run["stages"] if s["name"] == "clip_score"]
    if len(models) == 1 and models[0] in DATACOMP_SCORE:
        names["clip_score"] = DATACOMP_SCORE[models[0]]
    return names


def check_output(out: Path, workdir: str | Path, inputs: list[str], overwrite: bool) -> None:
    """Refuse any output folder where writing could destroy data: one that overlaps the run's inputs
    or work dir, one holding files export did not write, and an earlier export without ``overwrite``."""
    def overlaps(a: Path, b: Path) -> bool:
        return a == b or a.is_relative_to(b) or b.is_relative_to(a)

    if not is_url(workdir) and overlaps(out, Path(workdir).resolve()):
        raise RefusedOutput(f"--out {out} overlaps the work dir {workdir}: choose a folder outside it")
    folders = {Path(p).resolve().parent for p in inputs if not is_url(p)}
    hit = next((f for f in sorted(folders) if overlaps(out, f)), None)
    if hit is not None:
        raise RefusedOutput(f"--out {out} overlaps the folder of the input shards ({hit}): choose a folder "
                           "outside it (export never writes where inputs live)")
    if out.exists() and not out.is_dir():
        raise RefusedOutput(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise RefusedOutput(f"--out {out} holds files that export did not write: choose a new or empty folder")
        if not overwrite:
            raise RefusedOutput(f"--out {out} holds an earlier export: pass --overwrite to replace it")


def _order_key(uid: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}/{uid}".encode(), digest_size=8).digest()


# What the decision columns export adds mean (the stage tables' own columns carry their descriptions).
DECISION_DOCS = {"kept": "true when every filter of the run kept the sample",
                 "dropped_by": "id of the first stage of the run that dropped the sample (null when kept)",
                 "reason": "that stage's reason (e.g. lang:de, image:min_side), null when kept"}


def stale_stages(workdir: str, shard: str, stages: list[dict]) -> list[str]:
    """The stages of a run whose table for ``shard`` is missing or was written by another run's
    fingerprint (a later run of another pipeline or parameters over the same work dir)."""
    work = WorkDir.at(workdir)
    return [s["id"] for s in stages
            if (read_meta(work.stage_table(s["id"], shard)) or {}).get("fingerprint") != s["fingerprint"]]


def joined_shard(workdir: str, shard: str, stages: list[dict]) -> tuple[pl.DataFrame, dict[str, bytes]]:
    """Every column of every stage of a run for one shard (index order), plus kept / dropped_by /
    reason; and each column's description. Columns a stage never computes with its parameters on
    this pool (``columns`` in the run record; all-null) are left out."""
    work = WorkDir.at(workdir)
    df: pl.DataFrame | None = None
    docs: dict[str, bytes] = {}
    for st in stages:
        sid = st["id"]
        table = read_table(work.stage_table(sid, shard))
        computed = st.get("columns")  # absent in run records written before it was recorded
        drop = {c for c in table.column_names if c in _SKIP_COLUMNS}
        if computed is not None:
            drop |= {c for c in table.column_names if c != "uid" and not c.startswith(("keep_", "reason_"))
                     and c not in computed}
        table = table.drop_columns(sorted(drop))
        # a second stage of one kind (two clip_score stages): its columns are suffixed with its id
        rename = {c: f"{c}_{sid}" for c in table.column_names if c != "uid" and df is not None and c in df.columns}
        for f in table.schema:
            if f.metadata and b"description" in f.metadata:
                docs.setdefault(rename.get(f.name, f.name), f.metadata[b"description"])
        t = pl.from_arrow(table).rename(rename)
        df = t if df is None else df.join(t, on="uid", how="left", maintain_order="left")
    assert df is not None
    filt = [s["id"] for s in stages if f"keep_{s['id']}" in df.columns]
    docs |= {k: v.encode() for k, v in DECISION_DOCS.items()}
    return df.with_columns(*decision_exprs(filt)), docs


def described(df: pl.DataFrame, docs: dict[str, bytes], names: dict[str, str] | None = None) -> pa.Table:
    """``df`` as Arrow with each column's description as field metadata (as the work dir's tables)."""
    back = {v: k for k, v in (names or {}).items()}
    table = df.to_arrow()
    fields = [f.with_metadata({"description": docs[back.get(f.name, f.name)]}) if back.get(f.name, f.name) in docs
              else f for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def export_metadata(workdir: str, out: str, stages: list[dict], spec: ExportSpec, shard_path: str,
                    names: dict[str, str] | None = None) -> dict:
    """Map step: write this shard's metadata (kept rows) and pool (all rows); return kept keys.
    ``names`` renames columns (``--schema datacomp``). A shard whose tables are not all the run's
    is not written: its stale stages are returned instead."""
    shard = shard_name(shard_path)
    stale = stale_stages(workdir, shard, stages)
    if stale:
        return {"shard": shard, "stale": stale}
    df, docs = joined_shard(workdir, shard, stages)
    redacted = 0
    if spec.redact_pii:
        df, redacted = redact_captions(df, pii_params(stages))
    if names:
        df = df.rename({k: v for k, v in names.items() if k in df.columns})
    kept = df.filter(pl.col("kept"))
    if spec.shuffle_seed is not None:
        kept = kept.with_columns(pl.col("uid").map_elements(
            lambda u: _order_key(u, spec.shuffle_seed), return_dtype=pl.Binary).alias("_o")).sort("_o").drop("_o")
    decision_cols = [c for c in kept.columns if c.startswith(("keep_", "reason_"))] + ["kept", "dropped_by", "reason"]
    meta = kept.drop(decision_cols)
    write_table(described(meta, docs, names), Path(out) / "metadata" / f"{shard}.parquet", row_group_size=ROW_GROUP)
    if spec.write_pool:
        write_table(described(df, docs, names), Path(out) / "pool" / f"{shard}.parquet", row_group_size=ROW_GROUP)
    return {"shard": shard, "path": shard_path, "kept": kept.height, "rows": df.height, "redacted": redacted}


def pii_params(stages: list[dict]) -> dict[str, Any]:
    """The run's caption_pii parameters (kinds, phone regions): the stage that wrote ``pii_spans``."""
    return next(st["params"] for st in stages if "pii_spans" in st.get("columns", []))


def redact_captions(df: pl.DataFrame, params: dict[str, Any]) -> tuple[pl.DataFrame, int]:
    """``df`` with each caption's ``pii_spans`` replaced by their tags; and how many changed. Rows
    the stage did not look at (dropped before it) are searched here with its parameters, so the
    pool table, which keeps every row, holds no caption unredacted either."""
    from curate.algorithms.pii import find_pii, redact

    spans = df["pii_spans"].to_list()
    captions = df["caption"].to_list()
    kinds, regions = tuple(params["kinds"]), tuple(params["phone_regions"])
    out = [c if c is None else redact(c, s if s is not None else find_pii(c, kinds, regions))
           for c, s in zip(captions, spans)]
    changed = sum(a != b for a, b in zip(out, captions))
    return df.with_columns(pl.Series("caption", out, dtype=pl.String)), changed


def export_columns_problem(run: dict, spec: ExportSpec) -> str | None:
    """Why the run cannot give what ``spec`` asks for privacy (None: it can)."""
    columns = {c for st in run["stages"] for c in st.get("columns", [])}
    if spec.blur_faces and "face_bboxes" not in columns:
        return ("--blur-faces needs face boxes: run a faces stage first (pipelines/privacy.yaml, or add "
                "`- faces: {}` to the pipeline)")
    if spec.blur_faces and any(is_metadata_shard(p) for p in run["shards"]):
        return ("--blur-faces: a metadata pool has no images to blur; its face_bboxes are in metadata/ for the "
                "download (img2dataset's bbox_col) or the training loader to blur")
    if spec.caption != "original" and "caption_synthetic" not in columns:
        return (f"--caption {spec.caption} needs synthetic captions: run a recaption stage first "
                "(pipelines/recaption_all.yaml, or add `- recaption: {...}` to the pipeline)")
    if spec.redact_pii and "pii_spans" not in columns:
        return ("--redact-pii needs the caption_pii stage's spans: run it first (pipelines/privacy.yaml, or add "
                "`- caption_pii: {}` to the pipeline)")
    return None


def privacy_manifest(workdir: str, run: dict, spec: ExportSpec, blurred: int, redacted: int) -> dict:
    """What the manifest says about the privacy pass: detector, threshold and blur; redaction."""
    from curate.algorithms.face_blur import BLUR

    out: dict[str, Any] = {}
    work = WorkDir.at(workdir)
    for st in run["stages"]:
        if spec.blur_faces and "face_bboxes" in st.get("columns", []):
            meta = read_meta(work.stage_table(st["id"], shard_name(run["shards"][0]))) or {}
            out["blur_faces"] = {"stage": st["id"], "detector": (meta.get("describe") or {}).get("detector"),
                                 "threshold": st["params"].get("threshold"), "blur": BLUR, "images_blurred": blurred}
        if spec.redact_pii and "pii_spans" in st.get("columns", []):
            out["redact_pii"] = {"stage": st["id"], "kinds": st["params"].get("kinds"), "captions_redacted": redacted}
    return out


def refuse_stale(workdir: str, run: dict, stale: dict[str, list[str]]) -> None:
    """Refuse to export a run whose tables were rewritten since: name the stages, the run that
    wrote them and the command that restores the run's own tables."""
    stages = sorted({sid for sids in stale.values() for sid in sids}, key=[s["id"] for s in run["stages"]].index)
    work = WorkDir.at(workdir)
    by: set[str] = set()
    for rec in sorted((work.root / "runs").glob("*/run.json")):
        try:
            other = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if other.get("run_id") == run["run_id"]:
            continue
        for shard in list(stale)[:1]:
            for st in other.get("stages", []):
                fp = (read_meta(work.stage_table(st["id"], shard)) or {}).get("fingerprint")
                if st["id"] in stages and fp == st["fingerprint"]:
                    by.add(other["run_id"])
    rd = work.run_dir(run["run_id"])
    since = f", rewritten since by run {', '.join(sorted(by))}" if by else ""
    raise RefusedOutput(
        f"{workdir}: run {run['run_id']}'s tables of stage(s) {', '.join(stages)} are not its own on {len(stale)} "
        f"shard(s) (e.g. {next(iter(stale))}){since}; exporting would mix two runs. Restore them with `curate run "
        f"{rd / 'pipeline.yaml'} --config {rd / 'config.yaml'}`, or export the latest run (leave out --run)")


def _sample_json(row: dict[str, Any]) -> bytes:
    keep = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if row.get("face_bboxes"):  # DataComp's metadata carries them: loaders that blur read them here
        keep["face_bboxes"] = row["face_bboxes"]
    return json.dumps(keep, sort_keys=True, default=str).encode()


def caption_members(key: str, row: dict[str, Any], caption: str) -> list[tuple[str, bytes]]:
    """The caption members of one sample: ``.txt`` the alt-text (``original``), the synthetic
    caption where the sample has one (``synthetic``), or the alt-text and ``.synthetic.txt``
    (``both``: a loader can pick either per sample). A pair kept only for its synthetic caption
    (``rescued``) has that caption as its ``.txt`` whatever the choice: its alt-text failed."""
    original = row.get("caption", row.get("text")) or ""
    synthetic = row.get("caption_synthetic")
    if caption == "synthetic" or (row.get("rescued") and synthetic):
        return [(f"{key}.txt", (synthetic or original).encode())]
    members = [(f"{key}.txt", original.encode())]
    if caption == "both" and synthetic:
        members.append((f"{key}.synthetic.txt", synthetic.encode()))
    return members


def write_output_shard(out: str, job: tuple[int, list[dict]], blur: bool = False, caption: str = "original") -> dict:
    """Map step: output shard ``index`` from slices of input shards (original bytes, no re-encode;
    with ``blur``, images with faces are blurred and re-encoded)."""
    from curate.algorithms.face_blur import blur_faces

    index, plan = job
    path = Path(out) / "shards" / f"{index:05d}.tar"
    n = nbytes = blurred = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for part in plan:
            meta = pl.read_parquet(Path(out) / "metadata" / f"{part['shard']}.parquet").slice(
                part["start"], part["stop"] - part["start"])
            rows = meta.to_dicts()
            wanted = {r["key"] for r in rows}
            found: dict[str, tuple[bytes, str]] = {}
            for s in iter_samples(part["path"]):
                if s.key in wanted and s.image():
                    found[s.key] = (s.image(), s.image_ext())
            lost = wanted - found.keys()
            if lost:
                raise WorkDirError(f"input shard {part['path']} no longer holds {len(lost)} kept sample(s) "
                                   f"(e.g. key {sorted(lost)[0]}): it changed after the run; rerun it")
            for r in rows:  # metadata order (possibly shuffled), not tar order
                img, ext = found[r["key"]]
                if blur and r.get("face_bboxes"):
                    img, ext = blur_faces(img, ext, r["face_bboxes"])
                    blurred += 1
                key = f"{index:05d}{n:05d}"
                members = [(f"{key}.{ext}", img), *caption_members(key, r, caption), (f"{key}.json", _sample_json(r))]
                for name, data in members:
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644  # mtime 0: byte-identical reruns
                    tf.addfile(ti, io.BytesIO(data))
                    nbytes += len(data)
                n += 1
    return {"shard": path.name, "samples": n, "bytes": nbytes, "blurred": blurred}


def uids_to_npy(uids: list[str]) -> np.ndarray:
    """DataComp's subset format: sorted structured array of two uint64 halves of the 128-bit uid."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], dtype=np.dtype("u8,u8"))
    arr.sort()
    return arr


def plan_output(counts: list[dict], shard_size: int) -> list[list[dict]]:
    """Cut the concatenation of per-input kept rows into output shards of ``shard_size``."""
    plans: list[list[dict]] = []
    cur: list[dict] = []
    room = shard_size
    for c in counts:
        start = 0
        while start < c["kept"]:
            take = min(room, c["kept"] - start)
            cur.append({"shard": c["shard"], "path": c["path"], "start": start, "stop": start + take})
            start += take
            room -= take
            if room == 0:
                plans.append(cur)
                cur, room = [], shard_size
    if cur:
        plans.append(cur)
    return plans


def check_url_output(url: str, inputs: list[str], overwrite: bool) -> None:
    """The object-store counterpart of check_output: not a prefix of the inputs, and empty or an
    earlier export (replaced only with ``overwrite``)."""
    prefix = url.rstrip("/") + "/"
    if any(str(p).startswith(prefix) or prefix.startswith(str(p).rsplit("/", 1)[0] + "/") for p in inputs if is_url(p)):
        raise RefusedOutput(f"--out {url} overlaps the input shards' location: choose another prefix")
    fs, root = storage.filesystem(url)
    listed = fs.ls(root, detail=False) if fs.exists(root) else []
    if listed:
        if not fs.exists(f"{root.rstrip('/')}/{MARKER}"):
            raise RefusedOutput(f"--out {url} holds objects that export did not write (or an export that never "
                               "finished): choose a new prefix")
        if not overwrite:
            raise RefusedOutput(f"--out {url} holds an earlier export: pass --overwrite to replace it")


def _export_to_url(workdir: str, url: str, ex: Executor, spec: ExportSpec) -> dict:
    """Export into a local staging folder in the work dir, then upload it under ``url``: the
    objects of a replaced export are removed first, the marker last, so the prefix holds a
    complete export exactly when ``<url>/.curate-export.json`` exists (object stores have no
    atomic rename of a folder)."""
    run = run_record(workdir, spec.run_id)
    set_storage_options(run_storage_options(workdir, run["run_id"]))
    check_url_output(url, run["shards"], spec.overwrite)
    staging = (Path(tempfile.mkdtemp(prefix="curate-export-")) if is_url(workdir)
               else Path(workdir) / f".export-{secrets.token_hex(4)}")
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    try:
        manifest = _export_into(workdir, str(staging), run, ex, spec)
        if fs.exists(f"{root}/{MARKER}"):  # the earlier export stops counting as complete first
            fs.rm(f"{root}/{MARKER}")
        if fs.exists(root):
            fs.rm(root, recursive=True)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        last = staging / "manifest.json"
        for f in [f for f in files if f != last] + ([last] if last.exists() else []):
            fs.put_file(str(f), f"{root}/{f.relative_to(staging).as_posix()}")
        fs.pipe_file(f"{root}/{MARKER}", json.dumps({"workdir": workdir, "run_id": run["run_id"]}).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def export(workdir: str | Path, out: str | Path, ex: Executor, spec: ExportSpec = ExportSpec()) -> dict:
    """Write the curated outputs of a finished run into ``out``. Everything is written into a
    hidden folder beside ``out`` first and moved into place when complete, so ``out`` holds either
    the previous export or the new one, never a mix and never a half-written folder. ``out`` may be
    an fsspec URL (``s3://bucket/prefix``): see _export_to_url."""
    workdir = str(work_path(workdir))
    if is_url(str(out)):
        return _export_to_url(workdir, str(out), ex, spec)
    final = Path(out).resolve()
    run = run_record(workdir, spec.run_id)
    set_storage_options(run_storage_options(workdir, run["run_id"]))
    check_output(final, workdir, run["shards"], spec.overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
    try:
        manifest = _export_into(workdir, str(staging), run, ex, spec)
        atomic_write_bytes(staging / MARKER, json.dumps({"workdir": workdir, "run_id": run["run_id"]}).encode())
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` (absent, empty, or an earlier export) with ``staging``."""
    if final.is_dir() and any(final.iterdir()):
        old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if final.is_dir():
            final.rmdir()
        os.rename(staging, final)


def run_storage_options(workdir: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The storage options the run used for its inputs, as saved (credentials were never saved:
    they come from the environment again)."""
    import yaml

    try:
        saved = yaml.safe_load((WorkDir.at(workdir).run_dir(run_id) / "config.yaml").read_text()) or {}
    except OSError:
        return {}
    return {proto: {k: v for k, v in opts.items() if v != "***"}
            for proto, opts in (saved.get("storage_options") or {}).items()}


def _export_into(workdir: str, out: str, run: dict, ex: Executor, spec: ExportSpec) -> dict:
    stages = run["stages"]
    all_ids = [s["id"] for s in stages]
    options = run_storage_options(workdir, run["run_id"])
    set_storage_options(options)
    shards = run["shards"]
    missing = [shard_name(p) for p in shards if not WorkDir.at(workdir).stage_table(all_ids[-1], shard_name(p)).exists()]
    if missing:
        raise RefusedOutput(f"{workdir}: stage {all_ids[-1]} is not done on {len(missing)} shard(s) "
                           f"(e.g. {missing[0]}); finish the run before exporting")
    problem = export_columns_problem(run, spec)
    if problem:
        raise RefusedOutput(problem)
    order = list(shards)
    if spec.shuffle_seed is not None:
        order.sort(key=lambda p: _order_key(shard_name(p), spec.shuffle_seed))
    names = datacomp_names(run) if spec.schema == "datacomp" else None
    res = ex.map(functools.partial(call_with_options, options, export_metadata, workdir, out, stages, spec,
                                   names=names), order,
                 label="export:metadata")
    failed = [r for r in res if not r.ok]
    if failed:
        raise RuntimeError(f"export failed on {len(failed)} shard(s): {failed[0].item}: {failed[0].error}")
    stale = {r.value["shard"]: r.value["stale"] for r in res if "stale" in r.value}
    if stale:
        refuse_stale(workdir, run, stale)
    counts = [r.value for r in res]  # in `order`: the output numbering follows it
    # a metadata pool has no images to copy: its export is the metadata, the pool table and uids.npy
    plans = [] if any(is_metadata_shard(p) for p in shards) else plan_output(counts, spec.shard_size)
    outs = ex.map(functools.partial(call_with_options, options, write_output_shard, out, blur=spec.blur_faces,
                                    caption=spec.caption),
                  list(enumerate(plans)),
                  label="export:shards") if plans else []
    failed = [r for r in outs if not r.ok]
    if failed:
        raise RuntimeError(f"export failed on output shard {failed[0].item}: {failed[0].error}")
    sizes = {r.value["shard"]: r.value["samples"] for r in outs}
    kept_uids = pl.read_parquet(str(Path(out) / "metadata" / "*.parquet"), columns=["uid"])["uid"].to_list() \
        if any(c["kept"] for c in counts) else []
    buf = io.BytesIO()
    np.save(buf, uids_to_npy(kept_uids))
    atomic_write_bytes(Path(out) / "uids.npy", buf.getvalue())
    atomic_write_bytes(Path(out) / "shards" / "sizes.json", json.dumps(sizes, indent=1).encode())
    total = sum(c["rows"] for c in counts)
    manifest = {"workdir": workdir, "run_id": run["run_id"], "versions": run["versions"],
                "stages": run["stages"], "export": spec.__dict__, "samples_in": total,
                "samples_kept": len(kept_uids), "output_shards": len(plans), "sizes": sizes}
    if spec.blur_faces or spec.redact_pii:
        manifest["privacy"] = privacy_manifest(workdir, run, spec, sum(r.value["blurred"] for r in outs),
                                               sum(c["redacted"] for c in counts))
    atomic_write_bytes(Path(out) / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())
    if spec.hf_parquet:
        _write_hf_parquet(out, plans, ex)
    if not kept_uids:
        log.warning("export: every sample was dropped; outputs are valid and empty")
    return manifest


def hf_parquet_shard(out: str, index: int) -> str:
    """Parquet with embedded image bytes (``image: {bytes, path}``, ``text``), as HF datasets reads."""
    rows = {"uid": [], "text": [], "image": []}
    with tarfile.open(Path(out) / "shards" / f"{index:05d}.tar") as tf:
        members = {}
        for m in tf:
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for key, mem in members.items():
        ext = next(e for e in mem if e not in ("txt", "json"))
        meta = json.loads(mem["json"])
        rows["uid"].append(meta["uid"])
        rows["text"].append(mem["txt"].decode())
        rows["image"].append({"bytes": mem[ext], "path": f"{key}.{ext}"})
    schema = pa.schema([("uid", pa.string()), ("text", pa.string()),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    path = Path(out) / "hf" / f"{index:05d}.parquet"
    write_table(pa.table(rows, schema=schema), path, row_group_size=1000)
    return str(path)


def _write_hf_parquet(out: str, plans: list, ex: Executor) -> None:
    res = ex.map(functools.partial(hf_parquet_shard, out), list(range(len(plans))), label="export:hf")
    failed = [r for r in res if not r.ok]
    if failed:
        raise RuntimeError(f"HF parquet export failed: {failed[0].error}")
