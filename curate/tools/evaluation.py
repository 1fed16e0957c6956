"""Evaluation of a CLIP checkpoint on a labelled held-out set (DataComp's test, in miniature).

Zero-shot classification on every labelled attribute of the synthetic scenes (shape, colour,
count, position: class names + prompt templates, as for ImageNet), image-text retrieval R@1 both
ways, and matched-vs-shuffled caption ROC-AUC. Zero-shot scores are balanced accuracy (the mean of
per-class recall): the pool's concepts are long-tailed on purpose, and plain accuracy would reward a
model that always answers the head class. ``zeroshot_mean`` averages the tasks, as DataComp
averages its 38.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.io.shards import expand_input, iter_samples


class EvalSetError(ValueError):
    """The evaluation folder is not a labelled set this module can read."""


@dataclass(frozen=True)
class ZeroShotTask:
    column: str  # ground_truth.parquet column holding the class of each sample
    classes: dict[Any, str]  # class value -> its name in prompts
    templates: tuple[str, ...]  # prompts written for the task, not copied from training captions


def zero_shot_tasks() -> dict[str, ZeroShotTask]:
    from curate.tools.synth import COLORS, COUNTS, POSITIONS, SHAPES

    return {
        "shape": ZeroShotTask("shape", {s: s for s in SHAPES},
                              ("a photo of a {}", "a picture with a {}", "a simple drawing of a {}",
                               "one {} in the center")),
        "colour": ZeroShotTask("color", {c: c for c in COLORS},
                               ("a {} shape", "a photo of something {}", "{} shapes on a background",
                                "a drawing in {}")),
        "count": ZeroShotTask("count", dict(COUNTS), ("{} shapes", "a photo of {} things",
                                                      "a drawing with {} objects")),
        "position": ZeroShotTask("position", dict(POSITIONS), ("a shape {}", "a photo of an object {}",
                                                               "something {}")),
    }


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    allv = np.concatenate([pos, neg])
    ranks = allv.argsort().argsort().astype(np.float64) + 1
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]  # ties share their mean rank
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of the share of their samples predicted right."""
    return float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))


def encode(clip, images: list, texts: list[str], batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings."""
    import torch

    fi, ft = [], []
    with torch.inference_mode():
        for k in range(0, len(images), batch):
            x = torch.stack([clip.preprocess(im) for im in images[k:k + batch]])
            fi.append(torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1))
        for k in range(0, len(texts), batch):
            ft.append(torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(texts[k:k + batch])), dim=-1))

    def cat(xs):
        return torch.cat(xs).numpy() if xs else np.zeros((0, 0), dtype=np.float32)

    return cat(fi), cat(ft)


def load_eval_set(eval_dir: str | Path, max_samples: int) -> tuple[list, list[str], dict[str, list]]:
    """Clean samples' images, captions and ground-truth attributes, in shard order."""
    import polars as pl
    from PIL import Image

    eval_dir = Path(eval_dir)
    gt = eval_dir / "ground_truth.parquet"
    if not gt.exists():
        raise EvalSetError(f"{eval_dir}: no ground_truth.parquet (make one with `curate synth --clean`)")
    truth = pl.read_parquet(gt).filter(pl.col("label") == "clean")
    cols = sorted({t.column for t in zero_shot_tasks().values()})
    missing = [c for c in ["uid", *cols] if c not in truth.columns]
    if missing:
        raise EvalSetError(f"{gt}: missing columns {missing}")
    attrs = {row["uid"]: row for row in truth.select(["uid", *cols]).iter_rows(named=True)}
    images, caps, labels = [], [], {c: [] for c in cols}
    for p in expand_input(str(eval_dir / "*.tar")):
        for s in iter_samples(p):
            row = attrs.get(s.meta().get("uid"))
            if row is None or len(images) >= max_samples or not s.image() or not s.caption_bytes():
                continue
            images.append(Image.open(io.BytesIO(s.image())).convert("RGB"))
            caps.append(s.caption_bytes().decode("utf-8", "replace"))
            for c in cols:
                labels[c].append(row[c])
    if len(images) < 2:
        raise EvalSetError(f"{eval_dir}: {len(images)} clean labelled samples, need at least 2")
    return images, caps, labels


def evaluate_clip(model: str, checkpoint: str | None, eval_dir: str | Path, max_samples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Zero-shot balanced accuracy per task and their mean, retrieval R@1 both ways, match AUC."""
    from curate.models.clip import load_clip

    images, caps, labels = load_eval_set(eval_dir, max_samples)
    clip = load_clip(model, checkpoint)
    fi, ft = encode(clip, images, caps)
    out: dict[str, Any] = {"samples": len(images)}
    for name, task in zero_shot_tasks().items():
        values = list(task.classes)
        _, fc = encode(clip, [], [t.format(task.classes[v]) for v in values for t in task.templates])
        fc = fc.reshape(len(values), len(task.templates), -1).mean(1)
        fc /= np.linalg.norm(fc, axis=-1, keepdims=True)
        y = np.array([values.index(v) for v in labels[task.column]])
        out[f"zeroshot_{name}"] = round(balanced_accuracy(np.argmax(fi @ fc.T, axis=1), y), 4)
        out[f"chance_{name}"] = round(1 / len(np.unique(y)), 4)
    names = list(zero_shot_tasks())
    out["zeroshot_mean"] = round(float(np.mean([out[f"zeroshot_{n}"] for n in names])), 4)
    sim = fi @ ft.T
    n = len(images)
    out["retrieval_i2t_r1"] = round(float((sim.argmax(1) == np.arange(n)).mean()), 4)
    out["retrieval_t2i_r1"] = round(float((sim.argmax(0) == np.arange(n)).mean()), 4)
    perm = np.random.default_rng(seed).permutation(n)
    perm = np.where(perm == np.arange(n), (perm + 1) % n, perm)
    out["match_vs_shuffled_auc"] = round(roc_auc(np.diag(sim), sim[np.arange(n), perm]), 4)
    out["checkpoint"] = checkpoint
    return out
