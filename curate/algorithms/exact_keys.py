"""Exact duplicates: rows whose key columns (sha256 of the image bytes, a caption or url hash) are
equal, chained into pairs for the connected components."""
from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

# the combine table's columns each exact key compares
KEY_COLUMNS = {"image": ["sha256"], "image_caption": ["sha256", "caption_h"], "caption": ["caption_h"],
               "url": ["url_h"]}


def key_hash(text: str | None) -> int | None:
    """A 64-bit hash of a caption or url key (signed, as Parquet stores int64)."""
    if text is None:
        return None
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def equal_key_pairs(df: pl.DataFrame, cols: list[str]) -> np.ndarray:
    """Chain every group of rows with equal (non-null) keys: (first, other) pairs."""
    d = df.select(cols).with_row_index("_r").drop_nulls(cols)  # the key columns only: no copy of the rest
    if d.is_empty():
        return np.zeros((0, 2), dtype=np.int64)
    g = d.group_by(cols).agg(pl.col("_r").min().alias("first"), pl.col("_r")).filter(pl.col("_r").list.len() > 1)
    if g.is_empty():
        return np.zeros((0, 2), dtype=np.int64)
    e = g.select("first", "_r").explode("_r").filter(pl.col("_r") != pl.col("first"))
    return np.stack([e["first"].to_numpy(), e["_r"].to_numpy()], axis=1).astype(np.int64)


def exact_pairs(df: pl.DataFrame, keys: list[str]) -> np.ndarray:
    """Pairs of rows equal on any of ``keys`` (names of ``KEY_COLUMNS``)."""
    found = [equal_key_pairs(df, KEY_COLUMNS[k]) for k in keys]
    found = [f for f in found if len(f)]
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
