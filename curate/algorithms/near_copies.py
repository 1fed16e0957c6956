"""Near-duplicate images from their pHashes (``algorithms/phash.py``) over the dedup combine table:
within a Hamming radius, or one image's pHash near a crop window's pHash of another (confirmed by
their colour signatures)."""
from __future__ import annotations

import numpy as np
import polars as pl

from curate.algorithms.phash import COLOR_CELLS, color_distance, near_pairs

NO_PAIRS = np.zeros((0, 2), dtype=np.int64)


def phash_pairs(df: pl.DataFrame, radius: int) -> np.ndarray:
    """(row, row) pairs whose ``phash`` values are within ``radius`` bits."""
    ph = df["phash"].to_numpy()
    valid = np.flatnonzero(~df["phash"].is_null().to_numpy())
    pairs = near_pairs(ph[valid], radius)
    return valid[pairs] if len(pairs) else pairs


def crop_pairs(df: pl.DataFrame, radius: int, max_color_diff: float) -> np.ndarray:
    """(row, row) pairs where one image's pHash is within ``radius`` of a crop-window pHash
    (``phash_crops``) of the other, confirmed by their colour signatures (``color_sig``: the whole
    image, then each window)."""
    ok = ~(df["phash"].is_null() | df["phash_crops"].is_null() | df["color_sig"].is_null()).to_numpy()
    rows = np.flatnonzero(ok)
    if len(rows) < 2:
        return NO_PAIRS
    full = df["phash"].to_numpy()[rows]
    crops = np.array(df["phash_crops"].filter(ok).to_list(), dtype=np.int64)
    sig = np.array(df["color_sig"].filter(ok).to_list(), dtype=np.uint8).reshape(len(rows), -1, COLOR_CELLS)
    found = []
    for k in range(crops.shape[1]):
        pr = near_pairs(full, radius, other=crops[:, k])
        pr = pr[pr[:, 0] != pr[:, 1]]
        found.append(pr[color_distance(sig[pr[:, 0], 0], sig[pr[:, 1], k + 1]) <= max_color_diff])
    pairs = rows[np.concatenate(found)] if found else NO_PAIRS
    if not len(pairs):
        return NO_PAIRS
    return np.unique(np.sort(pairs, axis=1), axis=0).astype(np.int64)
