"""Caption near-duplicates: MinHash signatures (datasketch) over character shingles, and LSH
banding to find candidate pairs without comparing all pairs.

Signatures are computed per shard (``signatures``); the global step cuts each signature into ``b``
bands of ``r`` values (datasketch's choice of ``b, r`` for the threshold), rows whose band values
are equal become candidates (grouped in polars, chained to the smallest row of a bucket), and a
candidate pair is kept when the estimated Jaccard similarity (share of equal signature values)
reaches the threshold.
"""
from __future__ import annotations

import numpy as np
import polars as pl

SEED = 1  # the permutations of every signature; changing it changes every decision


def shingles(text: str, k: int) -> set[bytes]:
    """Character k-grams of ``text`` (the whole text when shorter)."""
    b = text.encode()
    return {b[i:i + k] for i in range(max(1, len(b) - k + 1))}


def signatures(texts: list[str], k: int, num_perm: int) -> list[list[int]]:
    from datasketch import MinHash

    mh = MinHash.bulk([shingles(t, k) for t in texts], num_perm=num_perm, seed=SEED)
    return [m.hashvalues.astype(np.uint32).tolist() for m in mh]


def signatures_or_none(texts: list[str | None], k: int, num_perm: int) -> list[list[int] | None]:
    """``signatures`` of the texts that are not None or empty, None for the others."""
    keyed = [j for j, t in enumerate(texts) if t]
    out: list[list[int] | None] = [None] * len(texts)
    for j, sig in zip(keyed, signatures([texts[j] for j in keyed], k, num_perm)):  # type: ignore[misc]
        out[j] = sig
    return out


def band_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives and negatives equally at ``threshold``."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def _chain_equal(keys: np.ndarray) -> np.ndarray:
    """(first, other) row pairs of every group of equal keys."""
    d = pl.DataFrame({"k": keys}).with_row_index("r")
    g = d.group_by("k").agg(pl.col("r").min().alias("first"), pl.col("r")).filter(pl.col("r").list.len() > 1)
    if g.is_empty():
        return np.zeros((0, 2), dtype=np.int64)
    e = g.select("first", "r").explode("r").filter(pl.col("r") != pl.col("first"))
    return np.stack([e["first"].to_numpy(), e["r"].to_numpy()], axis=1).astype(np.int64)


def similar_pairs(sig: np.ndarray, threshold: float) -> np.ndarray:
    """(i, j) row pairs, i < j, of an (n, num_perm) signature matrix whose estimated Jaccard
    similarity is at least ``threshold``."""
    n, num_perm = sig.shape
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    b, r = band_shape(threshold, num_perm)
    mult = np.random.default_rng(SEED).integers(1, 2**63 - 1, size=r, dtype=np.uint64) | np.uint64(1)
    found = []
    with np.errstate(over="ignore"):  # the band key is a polynomial hash modulo 2**64
        for band in range(b):
            key = (sig[:, band * r:(band + 1) * r].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
            found.append(_chain_equal(key))
    pairs = np.concatenate(found)
    if not len(pairs):
        return pairs
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    sim = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
    return pairs[sim >= threshold]


def caption_pairs(df: pl.DataFrame, threshold: float) -> np.ndarray:
    """(row, row) pairs of the dedup combine table whose caption signatures (``caption_mh``) reach
    ``threshold`` estimated Jaccard similarity."""
    ok = ~df["caption_mh"].is_null().to_numpy()
    rows = np.flatnonzero(ok)
    sig = np.array(df["caption_mh"].filter(ok).to_list(), dtype=np.uint32).reshape(len(rows), -1)
    pairs = similar_pairs(sig, threshold)
    return rows[pairs] if len(pairs) else pairs
