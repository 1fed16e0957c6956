"""recaption against the backend's own batched ``generate`` on the same images, in-process on the
CPU: open_clip's CoCa ``generate`` (its greedy route, top-k with k = 1) on the tiny CoCa
(``CURATE_BENCH_COCA`` names a trained checkpoint; default: seeded random weights, the same cost),
with the same batch and token cap; captions/s of each.
"""
from __future__ import annotations

import os
import shutil

import polars as pl

from curate.bench.common import BENCH_DIR, bench_pool, peak_rss_mb, save, timer
from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.io.images import reduced_decode
from curate.io.shards import expand_input, iter_samples
from curate.report.stats import funnel
from curate.runner.pipeline import run_pipeline

TOKENS, BATCH, SIDE = 16, 32, 512


def run(samples: int = 500) -> dict:
    import torch
    from PIL import Image

    from curate.models.clip import load_clip

    ckpt = os.environ.get("CURATE_BENCH_COCA") or None
    pool = bench_pool(samples)
    images = []
    for shard in expand_input(str(pool / "*.tar")):
        for s in iter_samples(shard):
            try:
                images.append(Image.fromarray(reduced_decode(s.image() or b"", s.image_ext(), SIDE, 10**8)[0]))
            except Exception:  # the pool's broken images: neither side captions them
                continue
    coca = load_clip("curate-tiny-coca", ckpt)
    with timer() as t:
        for i in range(0, len(images), BATCH):
            batch = torch.stack([coca.preprocess(im) for im in images[i:i + BATCH]])
            coca.model.generate(batch, seq_len=TOKENS + 1, generation_type="top_k", top_k=1)
    raw_s = t["seconds"]
    work = BENCH_DIR / "recaption-run"
    shutil.rmtree(work, ignore_errors=True)
    cfg = RunConfig.model_validate({"input": str(pool / "*.tar"), "workdir": str(work),
                                    "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})
    params = {"model": "curate-tiny-coca", "pretrained": ckpt, "max_new_tokens": TOKENS, "batch_size": BATCH,
              "decode_side": SIDE, "all_rows": True}
    s = run_pipeline(PipelineConfig(name="recaption_bench", stages=[StageSpec(name="recaption", params=params)]), cfg)
    assert s.ok, s.problems()
    stage_s = next(r["seconds"] for r in funnel(work) if r["stage"] == "recaption")
    written = pl.read_parquet(work / "recaption" / "*.parquet")["caption_synthetic"].drop_nulls().len()
    res = {"images": len(images), "captions_written": written, "weights": ckpt or "random (seed 0)",
           "max_new_tokens": TOKENS, "batch": BATCH, "threads": torch.get_num_threads(),
           "open_clip_generate_captions_per_s": round(len(images) / raw_s, 1),
           "recaption_stage_captions_per_s": round(written / stage_s, 1),
           "stage_over_raw": round(stage_s / raw_s, 3), "peak_rss_mb": round(peak_rss_mb())}
    save("captions", res)
    print(res)
    return res
