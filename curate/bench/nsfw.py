"""nsfw against the raw operation it sits on (NudeNet's detector called on each decoded image in a
loop), on the same images at the same decode size, in-process on one core; and what the default
rule drops on the 159 COCO photos when ``../shared/data`` is present (a safe-for-work set).
"""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from curate.bench.common import BENCH_DIR, bench_pool, peak_rss_mb, save, timer
from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.runner.pipeline import run_pipeline
from curate.report.stats import funnel
from curate.io.shards import expand_input, iter_samples

SIDE = 640
COCO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "images" / "coco_val2017_mini"


def _decoded(folder: Path) -> list[np.ndarray]:
    out = []
    for shard in expand_input(str(folder / "*.tar")):
        for s in iter_samples(shard):
            try:
                im = Image.open(io.BytesIO(s.image()))
                im.draft("RGB", (SIDE, SIDE))
                im.thumbnail((SIDE, SIDE))
                out.append(np.asarray(im.convert("RGB")))
            except Exception:
                continue
    return out


def _stage(folder: Path, work: Path) -> tuple[float, pl.DataFrame]:
    shutil.rmtree(work, ignore_errors=True)
    cfg = RunConfig.model_validate({"input": str(folder / "*.tar"), "workdir": str(work),
                                    "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})
    pipe = PipelineConfig(name="nsfw_bench", stages=[StageSpec(name="nsfw", params={"decode_side": SIDE,
                                                                                   "all_rows": True})])
    s = run_pipeline(pipe, cfg)
    assert s.ok, s.problems()
    seconds = next(r["seconds"] for r in funnel(work) if r["stage"] == "nsfw")
    return seconds, pl.read_parquet(work / "nsfw" / "*.parquet")


def run(samples: int = 1000) -> dict:
    from curate.models.nsfw_detector import detect_nsfw, load_nsfw_detector

    pool = bench_pool(samples)
    detector = load_nsfw_detector(1)
    images = _decoded(pool)
    detect_nsfw(detector, images[0])  # warm
    with timer() as t:
        for rgb in images:
            detect_nsfw(detector, rgb)
    raw_s = t["seconds"]  # detection alone: the stage's seconds include the decode as well
    with timer() as t:
        _decoded(pool)
    decode_s = t["seconds"]
    stage_s, table = _stage(pool, BENCH_DIR / "nsfw-run")
    res = {"samples": samples, "decode_side": SIDE, "images": len(images),
           "raw_detect_images_per_s": round(len(images) / raw_s, 1),
           "raw_decode_plus_detect_images_per_s": round(len(images) / (raw_s + decode_s), 1),
           "nsfw_stage_images_per_s": round(len(images) / stage_s, 1),
           "stage_over_raw_decode_plus_detect": round(stage_s / (raw_s + decode_s), 3),
           "synthetic_dropped": int((table["reason_nsfw"] == "nsfw:explicit").sum())}
    if COCO.is_dir():
        shards = BENCH_DIR / "nsfw-coco"
        if not list(shards.glob("*.tar")):
            shards.mkdir(parents=True, exist_ok=True)
            with tarfile.open(shards / "00000.tar", "w") as tf:
                for jpg in sorted(COCO.glob("*.jpg")):
                    for name, data in ((f"{jpg.stem}.jpg", jpg.read_bytes()), (f"{jpg.stem}.txt", b"a photo")):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        _, coco = _stage(shards, BENCH_DIR / "nsfw-coco-run")
        res["coco_photos"] = coco.height
        res["coco_dropped_at_default"] = int((coco["reason_nsfw"] == "nsfw:explicit").sum())
        res["coco_max_score"] = round(float(coco["nsfw_score"].max()), 4)
    res["peak_rss_mb"] = round(peak_rss_mb())
    save("nsfw", res)
    print(res)
    return res
