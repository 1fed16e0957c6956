"""Getting data in: a URL + caption list through img2dataset, or a folder of images with captions.

img2dataset does the downloading (its reader / downloader / writer, per-shard Parquet with
``status`` and ``error_message``, ``_stats.json``). It starts its workers with ``spawn`` and cannot
run inside a daemonic process, so this runs in the driver (the CLI), never in a Dask task.
Existing WebDataset shards (img2dataset or DataComp CommonPool layout) need no ingestion: give
them to ``curate run --input``.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from curate.core.config import ConfigError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")


@dataclass(frozen=True)
class IngestSpec:
    input_format: str = "parquet"  # parquet, csv, tsv, txt, json (img2dataset's names)
    url_col: str = "url"
    caption_col: str | None = "caption"
    processes: int = 2
    threads: int = 16
    samples_per_shard: int = 10_000
    timeout: int = 10
    retries: int = 0
    extra_columns: tuple[str, ...] = ()  # copied into each sample's json (e.g. uid)


def ingest_urls(url_list: str | Path, out: str | Path, spec: IngestSpec = IngestSpec()) -> dict:
    """Download with img2dataset into WebDataset shards; return its summed stats."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network
    from img2dataset import download

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    download(url_list=str(url_list), output_folder=str(out), output_format="webdataset",
             input_format=spec.input_format, url_col=spec.url_col, caption_col=spec.caption_col,
             processes_count=spec.processes, thread_count=spec.threads,
             number_sample_per_shard=spec.samples_per_shard, resize_mode="no", timeout=spec.timeout,
             retries=spec.retries, enable_wandb=False, compute_hash="sha256", distributor="multiprocessing",
             save_additional_columns=list(spec.extra_columns) or None,
             skip_reencode=True)  # keep the served bytes: dedup and exports rely on them
    totals: dict[str, int] = {}
    for p in sorted(out.glob("*_stats.json")):
        st = json.loads(p.read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] = totals.get(k, 0) + int(st.get(k, 0))
    if not totals.get("successes"):
        raise NothingDownloaded(out, totals)
    return totals


class NothingDownloaded(ConfigError):
    """img2dataset fetched no image: the URLs, the column names or the network are wrong."""

    def __init__(self, out: Path, totals: dict[str, int]):
        errors = download_errors(out)
        common = "; ".join(f"{msg} ({n}x)" for msg, n in errors.most_common(3)) or "no error recorded"
        super().__init__(f"ingest downloaded no image: {totals.get('count', 0)} URL(s) read, "
                         f"{totals.get('failed_to_download', 0)} failed to download; most common errors: {common}. "
                         f"Check the URL column (--url-col), the list and the network; per-URL status and "
                         f"error_message are in {out}/*.parquet")


def download_errors(out: Path) -> Counter:
    """img2dataset's ``error_message`` of every failed URL under ``out``, counted."""
    import pyarrow.parquet as pq

    errors: Counter = Counter()
    for p in sorted(out.glob("*.parquet")):
        if p.name.startswith("_"):
            continue
        try:
            t = pq.read_table(p, columns=["error_message"])
        except Exception:  # a file img2dataset did not finish or another table: not a status file
            continue
        errors.update(str(e)[:120] for e in t.column("error_message").to_pylist() if e)
    return errors


def ingest_survivors(workdir: str | Path, out: str | Path, spec: IngestSpec = IngestSpec()) -> dict:
    """Download only the samples a metadata run kept (its latest run's decisions), each with its
    uid in the json, so an image run over ``out`` keeps the same uids. Returns img2dataset's totals,
    the counts, and the bytes not downloaded (the dropped samples at the downloaded mean size);
    also written to ``WORK/ingest.json`` for the report."""
    import polars as pl

    from curate.core.config import ConfigError
    from curate.report.decisions import decisions
    from curate.io.parquet import atomic_write_bytes, read_frame
    from curate.io.storage import work_path

    work = work_path(workdir)
    d = decisions(work)
    idx = read_frame(work / "index" / "*.parquet", columns=["uid", "url", "caption"])
    kept = d.filter(pl.col("kept")).select("uid").join(idx, on="uid", how="left").sort("uid")
    if kept.is_empty():
        raise ConfigError(f"{work}: the latest run kept no sample; nothing to download")
    if kept["url"].null_count() == kept.height:
        raise ConfigError(f"{work}: the pool has no url column; a metadata pool needs one to be downloaded")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    urls = out / "_curate_urls.parquet"  # beside img2dataset's own per-shard files
    kept.filter(pl.col("url").is_not_null()).write_parquet(urls)
    totals = ingest_urls(urls, out, IngestSpec(**{**spec.__dict__, "input_format": "parquet", "url_col": "url",
                                                  "caption_col": "caption", "extra_columns": ("uid",)}))
    tars = sorted(out.glob("*.tar"))
    downloaded = sum(p.stat().st_size for p in tars)
    mean = downloaded / max(1, totals.get("successes", 0))
    result = {"pool": d.height, "kept_by_metadata_run": kept.height, "dropped_before_download": d.height - kept.height,
              "img2dataset": totals, "bytes_downloaded": downloaded,
              "bytes_not_downloaded_estimate": int(mean * (d.height - kept.height)), "out": str(out)}
    atomic_write_bytes(work / "ingest.json", json.dumps(result, indent=2).encode())
    return result


def ingest_folder(folder: str | Path, out: str | Path, samples_per_shard: int = 10_000) -> int:
    """A folder of images with sidecar captions (``x.jpg`` + ``x.txt``) to WebDataset shards."""
    import webdataset as wds

    folder, out = Path(folder), Path(out)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "%05d.tar")
    n = 0
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as sink:
        for img in images:
            cap = next((img.with_suffix(s) for s in CAPTION_SUFFIXES if img.with_suffix(s).exists()), None)
            caption = cap.read_text(encoding="utf-8", errors="replace").strip() if cap else None
            key = f"{n:09d}"
            rec = {"__key__": key, img.suffix.lower().lstrip(".").replace("jpeg", "jpg"): img.read_bytes(),
                   "json": json.dumps({"key": key, "source_path": str(img.relative_to(folder)), "caption": caption})}
            if caption is not None:
                rec["txt"] = caption
            sink.write(rec)
            n += 1
    return n
