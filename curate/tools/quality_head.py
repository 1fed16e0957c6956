"""The demo's image-quality head for `make compare`: a LAION-style linear head on the tiny CLIP's
image embeddings, trained on a labelled synthetic pool (blank and blurry images against clean ones).

LAION's aesthetic and NSFW heads are made the same way (a small model fitted on stored CLIP
embeddings of labelled images); none of them fits the tiny CLIP, so the compare row trains its own
and runs it through the `embedding_head` stage like a user's checkpoint.
"""
from __future__ import annotations

import logging
from glob import glob
from pathlib import Path

import numpy as np
import polars as pl

from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.runner.pipeline import run_pipeline
from curate.io.embeddings import embeddings
from curate.io.layout import WorkDir
from curate.io.parquet import read_table
from curate.tools.synth import synthesize

log = logging.getLogger("curate.tools.quality_head")

BAD_LABELS = ("blank_image", "blurry")


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 3000, lr: float = 2.0,
                 l2: float = 1e-4) -> tuple[np.ndarray, float]:
    """(weights, bias) of a class-balanced logistic regression, full-batch gradient descent in
    float64 from zero: the same data gives the same head on every machine (no random start)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    pos = max(y.sum(), 1.0)
    neg = max(len(y) - y.sum(), 1.0)
    sample_w = np.where(y > 0, 0.5 / pos, 0.5 / neg)
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        g = sample_w * (p - y)
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum()
    return w, b


def train_quality_head(root: Path, cfg: RunConfig, scorer: dict, samples: int = 2000, seed: int = 3000) -> Path:
    """``root/quality_head.pt``: P(clean image) from L2-normalised image embeddings of ``scorer``
    (clip_score params), fitted on a pool of ``samples`` synthetic pairs (15 % blank, 15 % blurry)
    that the evaluation and the compared pool do not share. Reused when present."""
    import torch

    out = root / "quality_head.pt"
    if out.exists():
        return out
    pool = root / "pool"
    if not (pool / "ground_truth.parquet").exists():
        synthesize(pool, samples=samples, shards=2, seed=seed, fractions={"blank_image": 0.15, "blurry": 0.15})
    work = root / "work"
    pipe = PipelineConfig(name="quality_head_train", stages=[
        StageSpec(name="clip_score", params=dict(scorer, all_rows=True))])
    summary = run_pipeline(pipe, cfg.model_copy(update={"input": str(pool / "*.tar"), "workdir": str(work)}))
    if not summary.ok:
        raise RuntimeError(f"scoring the quality head's training pool failed: {summary.problems()}")
    tables = [read_table(p, ["uid", "image_emb"]) for p in sorted(glob(WorkDir.at(work).stage_glob("clip_score")))]
    uids = [u for t in tables for u in t.column("uid").to_pylist()]
    emb = np.concatenate([embeddings(t, "image_emb") for t in tables])
    truth = dict(pl.read_parquet(pool / "ground_truth.parquet", columns=["uid", "label"]).iter_rows())
    ok = ~np.isnan(emb[:, 0])
    x = emb[ok] / np.linalg.norm(emb[ok], axis=1, keepdims=True)
    y = np.array([truth[u] not in BAD_LABELS for u, k in zip(uids, ok) if k], dtype=np.float64)
    w, b = fit_logistic(x, y)
    pred = (x @ w + b) > 0
    log.info("quality head: %d images (%d blank or blurry), training accuracy %.3f",
             len(y), int((y == 0).sum()), float((pred == (y > 0)).mean()))
    state = {"layers.0.weight": torch.tensor(w[None, :], dtype=torch.float32),
             "layers.0.bias": torch.tensor([b], dtype=torch.float32)}
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return out
