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
from dataclasses import dataclass
from pathlib import Path

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
             skip_reencode=True)  # keep the served bytes: dedup and exports rely on them
    totals: dict[str, int] = {}
    for p in sorted(out.glob("*_stats.json")):
        st = json.loads(p.read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] = totals.get(k, 0) + int(st.get(k, 0))
    return totals


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
