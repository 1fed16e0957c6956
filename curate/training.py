"""Proxy CLIP training with open_clip's own training code (open_clip_train), and evaluation.

``train_clip`` runs open_clip_train on WebDataset shards and leaves one checkpoint (state_dict
only, loadable with ``torch.load(weights_only=True)``) in the output folder. ``evaluate_clip``
measures zero-shot shape classification, image-text retrieval and matched-vs-shuffled ROC-AUC on
a labelled held-out set (the synthetic pool's clean split here).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from curate.io.shards import expand_input, iter_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    model: str = "curate-tiny"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0
    workers: int = 1
    threads: int = 2
    device: str = "cpu"
    # Fixed samples per epoch, drawn with replacement: every training set gets the same number
    # of steps whatever its size (DataComp compares curations at a fixed compute budget).
    samples_per_epoch: int | None = None


def count_samples(shards: list[str]) -> int:
    return sum(1 for p in shards for s in iter_samples(p) if s.image() and s.caption_bytes())


def train_clip(input: str | list[str], out_dir: str | Path, spec: TrainSpec = TrainSpec(),
               name: str = "proxy") -> Path:
    """Train with open_clip_train; return the path of the final checkpoint."""
    shards = expand_input(input)
    out = Path(out_dir).resolve()
    logs = out / "logs"
    shutil.rmtree(logs / name, ignore_errors=True)
    n = count_samples(shards)
    if n < spec.batch_size:
        raise ValueError(f"{n} samples in {len(shards)} shard(s): fewer than one batch of {spec.batch_size}")
    argv = ["--train-data", "::".join(shards), "--dataset-type", "webdataset",
            "--train-num-samples", str(spec.samples_per_epoch or n), "--model", spec.model, "--batch-size", str(spec.batch_size),
            "--epochs", str(spec.epochs), "--lr", str(spec.lr), "--warmup", str(spec.warmup),
            "--wd", "0.1", "--seed", str(spec.seed), "--workers", str(spec.workers),
            "--device", spec.device, "--precision", "fp32", "--logs", str(logs), "--name", name,
            "--save-frequency", str(spec.epochs), "--report-to", "", "--log-every-n-steps", "20"]
    if spec.samples_per_epoch:
        argv.append("--dataset-resampled")
    env = os.environ | {"OMP_NUM_THREADS": str(spec.threads), "WANDB_MODE": "disabled",
                        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.info("training %s on %d samples from %d shard(s), %d epochs", spec.model, n, len(shards), spec.epochs)
    r = subprocess.run([sys.executable, "-m", "curate.models.train_entry", *argv], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-20:])
        raise RuntimeError(f"open_clip training failed (exit {r.returncode}):\n{tail}")
    ckpts = sorted((logs / name / "checkpoints").glob("epoch_*.pt"),
                   key=lambda p: int(p.stem.split("_")[1]))
    if not ckpts:
        raise RuntimeError(f"open_clip training wrote no checkpoint under {logs / name}")
    import torch

    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    final = out / f"{name}.pt"
    tmp = final.with_suffix(".pt.tmp")
    torch.save({"state_dict": state}, tmp)
    os.replace(tmp, final)
    (out / f"{name}.json").write_text(json.dumps(asdict(spec) | {"samples": n, "shards": shards}, indent=2))
    return final


def _encode(clip, images: list, texts: list[str], batch: int = 256):
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


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    allv = np.concatenate([pos, neg])
    ranks = allv.argsort().argsort().astype(np.float64) + 1
    # average ranks of ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate_clip(model: str, checkpoint: str | None, eval_dir: str | Path, max_samples: int = 1000,
                  seed: int = 0) -> dict:
    """Zero-shot shape accuracy, retrieval R@1 both ways, matched-vs-shuffled ROC-AUC."""
    import polars as pl
    from PIL import Image

    from curate.models.clip import load_clip
    from curate.synth import SHAPES

    eval_dir = Path(eval_dir)
    truth = pl.read_parquet(eval_dir / "ground_truth.parquet").filter(pl.col("label") == "clean")
    shape_of = dict(zip(truth["uid"], truth["shape"]))
    images, caps, labels = [], [], []
    for p in expand_input(str(eval_dir / "*.tar")):
        for s in iter_samples(p):
            meta = s.meta()
            uid = meta.get("uid")
            if uid not in shape_of or len(images) >= max_samples:
                continue
            images.append(Image.open(io.BytesIO(s.image())).convert("RGB"))
            caps.append(s.caption_bytes().decode())
            labels.append(SHAPES.index(shape_of[uid]))
    clip = load_clip(model, checkpoint)
    fi, ft = _encode(clip, images, caps)
    templates = ["a photo of a {}", "a picture with a {}", "a simple drawing of a {}", "one {} in the center"]
    _, fc = _encode(clip, [], [t.format(c) for c in SHAPES for t in templates])
    fc = fc.reshape(len(SHAPES), len(templates), -1).mean(1)
    fc /= np.linalg.norm(fc, axis=-1, keepdims=True)
    acc = float((np.argmax(fi @ fc.T, axis=1) == np.array(labels)).mean())
    sim = fi @ ft.T
    n = len(images)
    i2t = float((sim.argmax(1) == np.arange(n)).mean())
    t2i = float((sim.argmax(0) == np.arange(n)).mean())
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    perm = np.where(perm == np.arange(n), (perm + 1) % n, perm)
    auc = roc_auc(np.diag(sim), sim[np.arange(n), perm])
    return {"samples": n, "zeroshot_shape_acc": round(acc, 4), "retrieval_i2t_r1": round(i2t, 4),
            "retrieval_t2i_r1": round(t2i, 4), "match_vs_shuffled_auc": round(auc, 4),
            "chance_zeroshot": round(1 / len(SHAPES), 4), "checkpoint": checkpoint}
