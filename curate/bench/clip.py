"""CLIP-score stage images/s against the raw forward of the same model, batch size and precision
on preloaded tensors, in the same run (target >= 0.85: the data path must not be the bottleneck)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from curate.bench.common import bench_pool, save, timer
from curate.io.shards import expand_input, iter_samples
from curate.models.clip import load_clip
from curate.stages.clip_score import ClipScoreStage


def bench_model(model: str, shard: str, n: int, batch: int, device: str, loader_workers: int = 0) -> dict:
    stage = ClipScoreStage(ClipScoreStage.Params(model=model, pretrained=None, batch_size=batch,
                                                 loader_workers=loader_workers))
    clip = stage.clip(device, None)
    samples = [s for _, s in zip(range(n), iter_samples(shard))]
    caps = [(s.caption_bytes() or b"").decode("utf-8", "replace") for s in samples]
    rows = [i for i, s in enumerate(samples) if s.image()]
    imgs, good = [], []
    for i in rows:
        try:
            imgs.append(clip.preprocess(Image.open(io.BytesIO(samples[i].image())).convert("RGB")))
            good.append(i)
        except Exception:  # corrupt synthetic images are skipped on the raw side
            continue
    x = torch.stack(imgs)
    toks = clip.tokenizer([caps[i] for i in good])
    if device == "cuda":
        x, toks = x.to(device), toks.to(device)
    stage._forward(clip, x[:batch], toks[:batch], device)  # warm up
    best_raw = best_stage = 0.0
    for _ in range(2):
        with timer() as t:
            with torch.inference_mode():
                for k in range(0, len(good), batch):
                    fi = clip.model.encode_image(x[k:k + batch])
                    ft = clip.model.encode_text(toks[k:k + batch])
                    ((fi / fi.norm(dim=-1, keepdim=True)) * (ft / ft.norm(dim=-1, keepdim=True))).sum(-1).cpu()
        best_raw = max(best_raw, len(good) / t["seconds"])
        with timer() as t:
            out, failed = stage.embed(shard, list(range(len(samples))), caps, device, None)
        best_stage = max(best_stage, len(out) / t["seconds"])
    return {"model": model, "device": device, "batch_size": batch, "images": len(good),
            "loader_workers": loader_workers,
            "raw_forward_images_per_s": round(best_raw, 1), "stage_images_per_s": round(best_stage, 1),
            "ratio": round(best_stage / best_raw, 3), "target_ratio": 0.85}


def run() -> dict:
    torch.set_num_threads(1)  # one Dask worker's share of this 2-core machine
    pool = bench_pool(4000, 4)
    shard = expand_input(str(pool / "00000.tar"))[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"curate-tiny": bench_model("curate-tiny", shard, 1000, 256, device),
           # decode in one DataLoader process beside the 1-thread forward (uses the second core)
           "curate-tiny+1_loader": bench_model("curate-tiny", shard, 1000, 256, device, loader_workers=1)}
    if device == "cuda":
        for m in ("ViT-B-32", "ViT-L-14"):
            res[m] = bench_model(m, shard, 1000, 256, device)
    save("clip", res)
    return res
