"""Vector helpers shared by the global stages: spherical k-means (faiss), top-1 assignment, and
assignment that keeps rows near a border in both clusters (SemDeDup)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def train_centroids(x: np.ndarray, k: int, seed: int, niter: int = 20, points_per_centroid: int = 256,
                    spherical: bool = True) -> np.ndarray:
    """k-means centroids (faiss), unit length when ``spherical`` (else plain means, as DataComp's
    image-based baseline trains them); at most ``points_per_centroid`` x k training points."""
    import faiss

    k = max(1, min(k, len(x)))
    work = min(len(x), points_per_centroid * k) * k
    # Small problems on one OpenMP thread: faiss's idle OpenMP threads spin after each call and
    # starve the numpy BLAS work between calls (`make bench` SemDeDup rows show the effect).
    with faiss_threads(1 if work < 50_000_000 else faiss.omp_get_max_threads()):
        km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=spherical, seed=seed, verbose=False,
                          max_points_per_centroid=points_per_centroid)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def nearest(cent: np.ndarray, x: np.ndarray, rows_per_chunk: int = 4096) -> np.ndarray:
    """Index of the nearest centroid by inner product: a BLAS product and an argmax per chunk
    (faster than faiss's flat search for top-1; see the reference benchmark)."""
    out = np.empty(len(x), dtype=np.int64)
    ct = np.ascontiguousarray(cent.T)
    for s in range(0, len(x), rows_per_chunk):
        out[s:s + rows_per_chunk] = np.argmax(x[s:s + rows_per_chunk] @ ct, axis=1)
    return out


def nearest_with_boundary(cent: np.ndarray, x: np.ndarray, boundary: float,
                          rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid, second centroid or -1): the second where its inner product is within
    ``boundary`` of the nearest's, so a row near the border between two clusters is searched in
    both (two close rows on either side of a border are then still compared)."""
    first = np.empty(len(x), dtype=np.int64)
    second = np.full(len(x), -1, dtype=np.int64)
    if len(cent) < 2:
        first[:] = 0
        return first, second
    ct = np.ascontiguousarray(cent.T)
    for s in range(0, len(x), rows_per_chunk):
        sim = x[s:s + rows_per_chunk] @ ct
        top = np.argpartition(-sim, 1, axis=1)[:, :2]
        ts = np.take_along_axis(sim, top, axis=1)
        swap = ts[:, 1] > ts[:, 0]
        top[swap] = top[swap][:, ::-1]
        ts[swap] = ts[swap][:, ::-1]
        first[s:s + rows_per_chunk] = top[:, 0]
        second[s:s + rows_per_chunk] = np.where(ts[:, 0] - ts[:, 1] <= boundary, top[:, 1], -1)
    return first, second


def members(first: np.ndarray, second: np.ndarray, k: int) -> list[np.ndarray]:
    """For each of ``k`` clusters, the rows assigned to it first or (near its border) second, in row order."""
    rows = np.concatenate([np.arange(len(first)), np.flatnonzero(second >= 0)])
    cluster = np.concatenate([first, second[second >= 0]])
    order = np.lexsort((rows, cluster))
    bounds = np.searchsorted(cluster[order], np.arange(k + 1))
    return [rows[order[bounds[c]:bounds[c + 1]]] for c in range(k)]
