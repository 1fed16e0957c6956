"""A CLIP-score threshold calibrated on held-out pairs, for the scorer that the run actually uses.

An absolute score threshold belongs to one scorer: retrain the model, or move it to another machine
or precision, and the same number keeps a different share of good pairs. Calibration scores a
held-out set of correctly captioned pairs twice with the pipeline's own CLIP stage: each image with
its caption (matched) and with the caption of another sample (shuffled: sample ``i`` with caption
``(i + n // 2) mod n``). The threshold is then chosen from the two score lists by a named rule:

- ``balanced``: the score that best separates matched from shuffled pairs (Youden's J, the largest
  true-positive rate minus false-positive rate; keep ``score >= threshold``);
- ``matched_recall``: the highest score that still keeps the share ``matched_recall`` of matched pairs.

What was chosen, with its held-out recall (matched kept), false-accept rate (shuffled kept) and
precision at an even mix, is written into the clip_rank artifact and printed with the run summary.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field

from curate.core.config import Strict
from curate.io.shards import expand_input, iter_samples

log = logging.getLogger(__name__)


class Calibration(Strict):
    heldout: str = Field(..., description="shards of correctly captioned pairs (path, glob, brace "
                                          "pattern or list file; relative paths from the current folder)")
    rule: Literal["balanced", "matched_recall"] = Field(
        "balanced", description="balanced: best matched-vs-shuffled separation; matched_recall: keep "
                                "this share of held-out matched pairs")
    matched_recall: float = Field(0.97, gt=0, lt=1, description="for rule matched_recall")
    max_samples: int = Field(2000, ge=20, description="held-out pairs scored at most")


def heldout_captions(shards: list[str], max_samples: int) -> list[tuple[str, int, str]]:
    """(shard path, row, caption) of the first ``max_samples`` held-out pairs with an image and a caption."""
    out: list[tuple[str, int, str]] = []
    for path in shards:
        for row, s in enumerate(iter_samples(path)):
            cap = s.caption_bytes()
            if s.image() and cap:
                out.append((path, row, cap.decode("utf-8", "replace")))
                if len(out) >= max_samples:
                    return out
    return out


def heldout_scores(clip_stage: Any, cal: Calibration, device: str,
                   model_cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Matched and shuffled scores of the held-out pairs, computed by ``clip_stage.embed`` (the same
    decode, preprocessing, precision and model as the pool's scores)."""
    pairs = heldout_captions(expand_input(cal.heldout), cal.max_samples)
    if len(pairs) < 20:
        raise ValueError(f"calibrate.heldout {cal.heldout!r}: {len(pairs)} usable pair(s), need at least 20")
    n = len(pairs)
    shuffled_caption = {k: pairs[(k + n // 2) % n][2] for k in range(n)}
    matched, shuffled = [], []
    for path in dict.fromkeys(p[0] for p in pairs):
        mine = [(k, row) for k, (p, row, _) in enumerate(pairs) if p == path]
        rows = [row for _, row in mine]
        for captions, dest in (({row: pairs[k][2] for k, row in mine}, matched),
                               ({row: shuffled_caption[k] for k, row in mine}, shuffled)):
            dense = [captions.get(r, "") for r in range(max(rows) + 1)]
            res, _ = clip_stage.embed(path, rows, dense, device, model_cache)
            dest += [res[r][0] for r in rows if r in res]
    return np.asarray(matched, dtype=np.float64), np.asarray(shuffled, dtype=np.float64)


def choose_threshold(matched: np.ndarray, shuffled: np.ndarray, cal: Calibration) -> dict[str, Any]:
    """The threshold by ``cal.rule`` and how it does on the held-out pairs (keep ``score >= t``)."""
    if cal.rule == "matched_recall":
        asc = np.sort(matched)
        t = float(asc[int(np.floor((1.0 - cal.matched_recall) * len(asc)))])
    else:
        cands = np.unique(np.concatenate([matched, shuffled]))
        tpr = 1.0 - np.searchsorted(np.sort(matched), cands, side="left") / len(matched)
        fpr = 1.0 - np.searchsorted(np.sort(shuffled), cands, side="left") / len(shuffled)
        t = float(cands[int(np.argmax(tpr - fpr))])  # first maximum: the lowest such threshold
    t = float(np.float32(t))  # scores are stored as float32: compare like with like
    recall = float((matched >= t).mean())
    false_accept = float((shuffled >= t).mean())
    return {"threshold": t, "rule": cal.rule, "heldout": cal.heldout, "heldout_pairs": int(len(matched)),
            "heldout_recall": round(recall, 4), "heldout_false_accept": round(false_accept, 4),
            "heldout_precision": round(recall / (recall + false_accept), 4) if recall + false_accept else None,
            "matched_median": round(float(np.median(matched)), 4),
            "shuffled_median": round(float(np.median(shuffled)), 4)}
