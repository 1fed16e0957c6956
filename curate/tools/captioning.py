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


def _spec(seed: int):
    """The scorer's recipe (batch 64, 6 epochs over 5,000 clean pairs at 32 px) on CoCa's
    architecture; the caption loss is weighted 2, the contrastive loss 1 (open_clip's defaults)."""
    from curate.tools.training import TrainSpec

    return replace(TrainSpec(epochs=6, batch_size=64, warmup=50), model=MODEL, seed=seed)


def ensure_captioner(models: Path, seed: int = 0, name: str = "curate-tiny-coca-synth") -> Path:
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


def main(argv: list[str] | None = None) -> int:
    from curate.tools.training import file_sha256

    ap = argparse.ArgumentParser(prog="curate.tools.captioning")
    ap.add_argument("--models", default=str(ROOT / "demo" / "models"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = ensure_captioner(Path(a.models), a.seed)
    _, heldout = demo_sets(a.seed)
    res = caption_accuracy(str(path), heldout) | {"checkpoint": str(path), "sha256": file_sha256(path)}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
