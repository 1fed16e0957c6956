"""text_mask against the raw operation it sits on (RapidOCR called on each decoded image in a
loop), and what its caption rule and caption MinHash dedup remove on a synthetic pool with the
defects they target.

Pool: the demo's defects plus 10 % ``text_caption`` samples (a sign's words rendered across the
scene, the caption only repeats them) and 5 % ``templated_caption`` (one spam template, only an
item number varies). Both runs are in-process on one core, the same images at the same
``detect_side``.
"""
from __future__ import annotations

import io
import shutil

import numpy as np
import polars as pl
from PIL import Image

from curate.bench.common import BENCH_DIR, peak_rss_mb, save, timer
from curate.core.config import RunConfig
from curate.runner.pipeline import run_pipeline
from curate.report.stats import funnel
from curate.io.shards import expand_input, iter_samples
from curate.tools.synth import DEFAULT_FRACTIONS, synthesize

FRACTIONS = DEFAULT_FRACTIONS | {"text_caption": 0.10, "templated_caption": 0.05}
SIDE = 640


def _pool(n: int):
    folder = BENCH_DIR / f"text-pool-{n}"
    if not (folder / "ground_truth.parquet").exists():
        shutil.rmtree(folder, ignore_errors=True)
        synthesize(folder, samples=n, shards=2, seed=11, fractions=FRACTIONS)
    return folder


def _raw(folder) -> tuple[float, int]:
    """Seconds and images for decode (reduced to SIDE) + RapidOCR over every decodable image."""
    from curate.models.text_detector import detect_text, load_text_detector

    engine = load_text_detector(SIDE)
    n = 0
    with timer() as t:
        for shard in expand_input(str(folder / "*.tar")):
            for s in iter_samples(shard):
                try:
                    im = Image.open(io.BytesIO(s.image()))
                    im.draft("RGB", (SIDE, SIDE))
                    im.thumbnail((SIDE, SIDE))
                    rgb = np.asarray(im.convert("RGB"))
                except Exception:
                    continue
                detect_text(engine, rgb)
                n += 1
    return t["seconds"], n


def run(n: int = 1000) -> dict:
    folder = _pool(n)
    truth = pl.read_parquet(folder / "ground_truth.parquet", columns=["uid", "label"])
    _raw(folder)  # warm: model load, page cache
    raw_s, raw_n = _raw(folder)
    work = BENCH_DIR / "text-mask-run"
    shutil.rmtree(work, ignore_errors=True)
    cfg = RunConfig.model_validate({"input": str(folder / "*.tar"), "workdir": str(work),
                                    "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})
    from curate.core.config import PipelineConfig, StageSpec

    pipe = PipelineConfig(name="text_mask_bench", stages=[
        StageSpec(name="text_mask", params={"detect_side": SIDE, "max_caption_overlap": 0.5, "all_rows": True}),
        StageSpec(name="dedup", params={"exact": [], "phash_radius": None, "caption_jaccard": 0.85,
                                        "scores_from": None, "embeddings_from": None, "all_rows": True})])
    with timer() as t:
        s = run_pipeline(pipe, cfg)
    assert s.ok, s.problems()
    tm = pl.read_parquet(work / "text_mask" / "*.parquet").join(truth, on="uid")
    dd = pl.read_parquet(work / "dedup" / "*.parquet", columns=["uid", "reason_dedup"]).join(truth, on="uid")
    stage_s = next(r["seconds"] for r in funnel(work) if r["stage"] == "text_mask")

    def rule(frame: pl.DataFrame, fired: pl.Expr, label: str) -> dict:
        hit = frame.filter(fired)
        target = frame.filter(pl.col("label") == label).height
        tp = hit.filter(pl.col("label") == label).height
        return {"dropped": hit.height, "target_rows": target,
                "precision": round(tp / hit.height, 3) if hit.height else None,
                "recall": round(tp / target, 3) if target else None,
                "dropped_by_label": dict(sorted(hit.group_by("label").len().iter_rows()))}

    has_text = tm.filter(pl.col("text_area") > 0)
    res = {"samples": n, "detect_side": SIDE,
           "raw_rapidocr_images_per_s": round(raw_n / raw_s, 1),
           "text_mask_stage_images_per_s": round(raw_n / stage_s, 1),
           "stage_over_raw_seconds": round(stage_s / raw_s, 3),
           "pipeline_s": round(t["seconds"], 1),
           "text_found_share_by_label": {k: round(v, 3) for k, v in sorted(
               tm.group_by("label").agg((pl.col("text_area") > 0).mean()).iter_rows()) if v is not None},
           "rows_with_text": has_text.height,
           "caption_is_text_rule": rule(tm, pl.col("reason_text_mask") == "text_mask:caption_is_text", "text_caption"),
           "caption_jaccard_dedup": rule(dd, pl.col("reason_dedup").is_not_null(), "templated_caption"),
           "peak_rss_mb": round(peak_rss_mb())}
    save("text_mask", res)
    print(res)
    return res
