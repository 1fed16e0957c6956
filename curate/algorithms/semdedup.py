"""SemDeDup (Abbas et al., 2023) at pool scale: pairs of embeddings closer than a cosine, found
inside k-means clusters. The pool streams to one file per top-level cluster (each at most about
TOP_CLUSTER_ROWS rows, so it fits in memory), then each cluster is split recursively into leaves
of about the same size and searched exhaustively; rows within ``boundary`` of a border go to both
sides, so pairs across a split are not missed. Clusters are read back in row (uid) order, so a
split sees the same rows in the same order however the pool is sharded."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl

from curate.algorithms.phash import unique_pairs
from curate.algorithms.sampling import sample_share, uid_sample
from curate.algorithms.vectors import members, nearest_with_boundary, train_centroids
from curate.io.embeddings import read_f16_rows, unit


TOP_CLUSTER_ROWS = 200_000  # in-memory size of a top-level cluster: 400 MB of 512-d float32
MAX_BRANCH = 16  # k of one split below the top level


def top_level_k(n: int) -> int:
    """Top-level clusters for SemDeDup: the pool streams to one file per top cluster, so each must
    fit in memory; everything below is split in memory."""
    return max(1, math.ceil(n / TOP_CLUSTER_ROWS))


def split_k(size: int, max_size: int) -> int:
    """k for splitting a cluster of ``size`` rows: plan the fewest levels of at most MAX_BRANCH
    that bring it to leaves of about max_size / 2, and split evenly across them. Leaves then have
    about the same size whatever the pool size, so the in-leaf search (the bulk of the work) costs
    the same per row and the whole search stays near-linear in the pool."""
    ratio = size / (max_size / 2)
    levels = max(1, math.ceil(math.log(ratio) / math.log(MAX_BRANCH)))
    return int(min(MAX_BRANCH, max(2, math.ceil(ratio ** (1 / levels)))))


def _cluster_pairs(emb: np.ndarray, rows: np.ndarray, min_cos: float, max_size: int, seed: int,
                   boundary: float = 0.0) -> np.ndarray:
    """(row, row) pairs with cosine > ``min_cos`` inside one cluster; a cluster larger than
    ``max_size`` is split by k-means first, rows within ``boundary`` of a border going to both
    sides (with 0, pairs across the split are missed, as in SemDeDup)."""
    if len(rows) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if len(rows) > max_size:
        k = split_k(len(rows), max_size)
        cent = train_centroids(emb, k, seed, niter=10, points_per_centroid=64)
        parts = []
        for sel in members(*nearest_with_boundary(cent, emb, boundary), len(cent)):
            if 2 <= len(sel) < len(rows):  # a split that moved nothing would recurse forever
                parts.append(_cluster_pairs(emb[sel], rows[sel], min_cos, max_size, seed + 1, boundary))
        parts = [x for x in parts if len(x)]
        return unique_pairs(np.concatenate(parts)) if parts else np.zeros((0, 2), dtype=np.int64)
    i, j = np.nonzero(emb @ emb.T > min_cos)
    upper = i < j
    a, b = rows[i[upper]], rows[j[upper]]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)


def semantic_pairs_in_memory(x: np.ndarray, min_cos: float, max_cluster_size: int, seed: int = 0,
                             kmeans_sample: int = 200_000, boundary: float = 0.02) -> tuple[np.ndarray, int]:
    """SemDeDup on vectors already in memory (the benchmark's path; the stage streams shards
    through the same three functions): pairs and the number of top-level clusters."""
    k = top_level_k(len(x))
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:kmeans_sample])
    cent = train_centroids(x[pick], k, seed)
    out = [_cluster_pairs(x[sel], sel, min_cos, max_cluster_size, seed, boundary)
           for sel in members(*nearest_with_boundary(cent, x, boundary), len(cent))]
    out = [o for o in out if len(o)]
    return (unique_pairs(np.concatenate(out)) if out else np.zeros((0, 2), dtype=np.int64)), len(cent)


def streamed_pairs(centroids: np.ndarray, shards: Iterable[tuple[np.ndarray, np.ndarray]], d: int, scratch: Path,
                   min_cos: float, max_cluster_size: int, seed: int, boundary: float) -> np.ndarray:
    """(row, row) pairs with cosine > ``min_cos`` over a pool given shard by shard as (rows,
    embeddings as stored): each embedding is appended to its top-level cluster's file (float16:
    half the bytes of unit float32 rows, so the files stay in the page cache longer), then one
    cluster at a time is read back and searched."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for rows, stored in shards:
        if not len(rows):
            continue
        first, second = nearest_with_boundary(centroids, unit(stored.copy()), boundary)
        for c, sel in enumerate(members(first, second, len(centroids))):
            if not len(sel):
                continue
            with open(scratch / f"{c}.f16", "ab") as f:
                f.write(stored[sel].astype(np.float16).tobytes())
            with open(scratch / f"{c}.rows", "ab") as f:
                f.write(rows[sel].astype(np.int64).tobytes())
    out = [_cluster_file_pairs(scratch, c, d, min_cos, max_cluster_size, seed, boundary)
           for c in range(len(centroids)) if (scratch / f"{c}.f16").exists()]
    shutil.rmtree(scratch, ignore_errors=True)
    out = [o for o in out if len(o)]
    return unique_pairs(np.concatenate(out)) if out else np.zeros((0, 2), dtype=np.int64)


def _cluster_file_pairs(scratch: Path, c: int, d: int, min_cos: float, max_size: int, seed: int,
                        boundary: float) -> np.ndarray:
    """Pairs within top-level cluster ``c``, read from its files (freed on return, before the
    next cluster is read), its rows in uid order."""
    emb = unit(read_f16_rows(scratch / f"{c}.f16", d))
    rows = np.fromfile(scratch / f"{c}.rows", dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    return _cluster_pairs(emb[order], rows[order], min_cos, max_size, seed, boundary)


def pool_pairs(uids: pl.Series, shard_embeddings: Callable[[int, bool], tuple[np.ndarray, np.ndarray]],
               n_shards: int, scratch: Path, *, min_cos: float, max_cluster_size: int, seed: int,
               boundary: float, n_clusters: int | None, kmeans_sample: int) -> np.ndarray:
    """SemDeDup over a pool read shard by shard: ``shard_embeddings(k, unit_length)`` gives the
    k-th shard's (rows, image embeddings); ``uids`` are the rows' uids. The top-level k-means
    trains on a sample drawn by uid, ordered by uid (the same rows in the same order whatever the
    sharding); every shard then streams to its cluster's file (``streamed_pairs``)."""
    share = sample_share(kmeans_sample, len(uids))
    sample, sampled = [], []
    for k in range(n_shards):
        rows, emb = shard_embeddings(k, True)
        if len(rows):
            shard_uids = uids.gather(rows).to_list()
            pick = uid_sample(shard_uids, seed, share)
            sample.append(emb[pick])
            sampled += [u for u, keep in zip(shard_uids, pick) if keep]
    if not sampled:
        return np.zeros((0, 2), dtype=np.int64)
    train = np.concatenate(sample)[np.argsort(sampled, kind="stable")]
    del sample, sampled
    d = train.shape[1]
    cent = train_centroids(train, n_clusters or top_level_k(len(uids)), seed)
    del train
    stored = (shard_embeddings(k, False) for k in range(n_shards))
    return streamed_pairs(cent, stored, d, scratch, min_cos, max_cluster_size, seed, boundary)
