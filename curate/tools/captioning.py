"""A tiny CoCa captioner trained on the synthetic pool's clean pairs with open_clip's own training
code (as the demo trains its scorer: deterministic, cached in the model folder), and how well the
captions it writes describe the images: the share that name the right colour, the right shape, and
both, on the held-out clean pairs whose ground truth knows them.

``python -m curate.tools.captioning [--models demo/models]`` trains (or reuses) it and prints the
figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from curate.tools.demo import ROOT, demo_sets

log = logging.getLogger(__name__)
MODEL = "curate-tiny-coca"
CAPTIONER = "curate-tiny-coca-synth"  # its file name (.pt) in the model folder


def _spec(seed: int):
    """The scorer's recipe (batch 64, 6 epochs over 5,000 clean pairs at 32 px) on CoCa's
    architecture; the caption loss is weighted 2, the contrastive loss 1 (open_clip's defaults)."""
    from curate.tools.training import TrainSpec

    return replace(TrainSpec(epochs=6, batch_size=64, warmup=50), model=MODEL, seed=seed)


def ensure_captioner(models: Path, seed: int = 0, name: str = CAPTIONER) -> Path:
    """The tiny CoCa, trained on the demo's clean training pairs (reused when trained before with
    the same spec and data)."""
    from curate.tools.training import train_clip

    train_dir, _ = demo_sets(seed)
    return train_clip(str(train_dir / "*.tar"), models, _spec(seed), name=name)


def _names(word: str) -> re.Pattern:
    """A word in a caption, singular or plural."""
    return re.compile(rf"\b{re.escape(word)}(?:e?s)?\b")


def caption_accuracy(checkpoint: str | None, eval_dir: Path, max_samples: int = 500, batch: int = 50) -> dict[str, Any]:
    """Share of the generated captions that name the image's colour, its shape, and both."""
    from curate.models.captioner import open_clip_captioner
    from curate.tools.evaluation import load_eval_set

    images, _, labels = load_eval_set(eval_dir, max_samples)
    captioner = open_clip_captioner(MODEL, checkpoint, max_new_tokens=16)
    texts: list[str] = []
    for i in range(0, len(images), batch):
        texts += captioner.caption(images[i:i + batch])
    colour = [bool(_names(c).search(t)) for c, t in zip(labels["color"], texts)]
    shape = [bool(_names(s).search(t)) for s, t in zip(labels["shape"], texts)]
    n = len(texts)
    return {"samples": n, "colour_right": round(sum(colour) / n, 4), "shape_right": round(sum(shape) / n, 4),
            "both_right": round(sum(a and b for a, b in zip(colour, shape)) / n, 4),
            "examples": [{"caption": t, "colour": c, "shape": s} for t, c, s in
                         list(zip(texts, labels["color"], labels["shape"]))[:8]]}


def rescue_figures(pool: Path, work: Path, scorer: Path, captioner: Path, heldout: Path) -> dict[str, Any]:
    """``recaption_rescue``'s rule on a synthetic pool with the demo's scorer and the tiny CoCa: per
    ground-truth label, the pairs the alt-text kept, the pairs rescued, and the rescued pairs whose
    synthetic caption names the image's colour and shape."""
    import polars as pl

    from curate.core.config import PipelineConfig, RunConfig, StageSpec
    from curate.runner.pipeline import run_pipeline

    clip = {"model": "curate-tiny", "pretrained": str(scorer), "batch_size": 256, "store_embeddings": False}
    pipe = PipelineConfig(name="recaption_rescue_demo", stages=[
        StageSpec(name="image", params={"min_side": 200, "max_aspect": 3.0, "max_dominant_share": 0.97,
                                        "min_blur_var": 20.0}),
        StageSpec(name="clip_score", params=clip),
        StageSpec(name="recaption", params={"model": MODEL, "pretrained": str(captioner), "max_new_tokens": 16,
                                            "batch_size": 64}),
        StageSpec(name="clip_score", id="clip_score_synthetic", params=clip | {"caption_from": "recaption"}),
        StageSpec(name="clip_rank", params={"calibrate": {"heldout": str(heldout / "*.tar"), "rule": "balanced"},
                                            "rescue_from": "clip_score_synthetic"})])
    cfg = RunConfig.model_validate({"input": str(pool / "*.tar"), "workdir": str(work),
                                    "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})
    summary = run_pipeline(pipe, cfg)
    if not summary.ok:
        raise RuntimeError(f"the rescue run failed: {summary.problems()}")
    index = pl.read_parquet(work / "index" / "*.parquet", columns=["uid"])
    rank = pl.read_parquet(work / "clip_rank" / "*.parquet", columns=["uid", "keep_clip_rank", "rescued"])
    caps = pl.read_parquet(work / "recaption" / "*.parquet", columns=["uid", "caption_synthetic"])
    truth = pl.read_parquet(pool / "ground_truth.parquet", columns=["uid", "label", "shape", "color"])
    t = index.join(rank, on="uid", how="left").join(caps, on="uid", how="left").join(truth, on="uid", how="left")
    right = [bool(c) and bool(_names(col).search(c)) and bool(_names(sh).search(c))
             for c, col, sh in zip(t["caption_synthetic"].to_list(), t["color"].to_list(), t["shape"].to_list())]
    t = t.with_columns(pl.Series("right", right))
    out: dict[str, Any] = {}
    for label in ("clean", "mismatch", "junk_caption", "non_english"):
        g = t.filter(pl.col("label") == label)
        rescued = g.filter(pl.col("rescued").fill_null(False))
        out[label] = {"pairs": g.height,
                      "kept_by_alt_text": int((g["keep_clip_rank"].fill_null(False) & ~g["rescued"].fill_null(False)).sum()),
                      "rescued": rescued.height, "rescued_with_right_caption": int(rescued["right"].sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    from curate.tools.training import file_sha256

    ap = argparse.ArgumentParser(prog="curate.tools.captioning")
    ap.add_argument("--models", default=str(ROOT / "demo" / "models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rescue-pool", default=None, help="also run recaption_rescue's rule on this synthetic pool "
                    "(e.g. demo/pool-v3-5000x10-seed0) with the demo's scorer, and print its figures")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = ensure_captioner(Path(a.models), a.seed)
    _, heldout = demo_sets(a.seed)
    res = caption_accuracy(str(path), heldout) | {"checkpoint": str(path), "sha256": file_sha256(path)}
    if a.rescue_pool:
        from curate.tools.demo import SCORER, ensure_scorer

        scorer = ensure_scorer(ROOT / "demo" / "models", a.seed, name=Path(SCORER).stem)  # the demo's
        res["rescue"] = rescue_figures(Path(a.rescue_pool), Path(a.models) / "rescue-work", scorer, path, heldout)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
