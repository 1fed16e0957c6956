"""Text regions of an image as boxes: their share of the image (CAT), their masking (T-MARS), and
how much of a caption is only the text the image shows.

A box is ``[x0, y0, x1, y1]`` in fractions of the image's width and height, so the same boxes apply
to the image at any decoded size (the detector's, the CLIP preprocessing's).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

Box = Sequence[float]

# Caption words as the overlap counts them: runs of three or more letters or digits, lower-cased
# (shorter ones, "a", "of", "on", would be found inside almost any text).
_WORD = re.compile(r"[^\W_]{3,}")
_NOT_WORD = re.compile(r"[\W_]+")


def quad_to_box(quad: Sequence[Sequence[float]], width: int, height: int) -> list[float]:
    """The axis-aligned hull of a detected quadrilateral (pixel corners), as image fractions."""
    xs = [p[0] for p in quad]
    ys = [p[1] for p in quad]
    return [min(max(min(xs) / width, 0.0), 1.0), min(max(min(ys) / height, 0.0), 1.0),
            min(max(max(xs) / width, 0.0), 1.0), min(max(max(ys) / height, 0.0), 1.0)]


def _pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A box in whole pixels, covering every pixel the box touches, at least one pixel wide."""
    x0, y0 = int(np.floor(box[0] * width)), int(np.floor(box[1] * height))
    x1, y1 = int(np.ceil(box[2] * width)), int(np.ceil(box[3] * height))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def covered_share(boxes: Sequence[Box], grid: int = 256) -> float:
    """Share of the image covered by the union of ``boxes`` (overlaps counted once), measured on a
    ``grid`` x ``grid`` raster of the image."""
    if not boxes:
        return 0.0
    mask = np.zeros((grid, grid), dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = _pixels(b, grid, grid)
        mask[y0:y1, x0:x1] = True
    return float(mask.mean())


def fill_regions(rgb: np.ndarray, boxes: Sequence[Box], ring: float = 0.25) -> np.ndarray:
    """A copy of ``rgb`` (H x W x 3 uint8) with each box filled by the mean colour of a ring around
    it (T-MARS's masking: the text is gone, the scene's colour stays). The ring is ``ring`` times
    the box's shorter side wide, at least 2 pixels; where it holds no pixel outside every box, the
    whole image's mean is used."""
    out = rgb.copy()
    if not boxes:
        return out
    h, w = rgb.shape[:2]
    inside = np.zeros((h, w), dtype=bool)
    rects = [_pixels(b, w, h) for b in boxes]
    for x0, y0, x1, y1 in rects:
        inside[y0:y1, x0:x1] = True
    fallback = rgb.reshape(-1, 3).mean(axis=0)
    for x0, y0, x1, y1 in rects:
        r = max(2, int(round(ring * min(x1 - x0, y1 - y0))))
        X0, Y0, X1, Y1 = max(0, x0 - r), max(0, y0 - r), min(w, x1 + r), min(h, y1 + r)
        around = ~inside[Y0:Y1, X0:X1]
        colour = rgb[Y0:Y1, X0:X1][around].mean(axis=0) if around.any() else fallback
        out[y0:y1, x0:x1] = np.round(colour).astype(np.uint8)
    return out


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def caption_overlap(caption: str, image_text: str) -> float | None:
    """Share of the caption's words found in the text read in the image (1.0: the caption only spells
    the image's text); None when the caption has no word. A word is found anywhere in the image
    text with its spaces and punctuation removed: recognisers often miss the space between words
    ("SUMMERSALE")."""
    cap = words(caption or "")
    if not cap:
        return None
    squashed = _NOT_WORD.sub("", (image_text or "").lower())
    return sum(w in squashed for w in cap) / len(cap)
