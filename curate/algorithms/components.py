"""Connected components of an edge list over row ids (scipy's sparse-graph routine, no per-row loop)."""
from __future__ import annotations

import numpy as np


def component_roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """For each of ``n`` rows, the smallest row id of its connected component under the undirected
    edges ``pairs`` ((m, 2) row ids): transitive, independent of edge order and duplicates."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = np.arange(n, dtype=np.int64)
    if n == 0 or len(pairs) == 0:
        return rows
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, labels, rows)
    return smallest[labels]


def representatives(roots: np.ndarray, score: np.ndarray | None) -> np.ndarray:
    """The kept row of each group, indexed by root: highest ``score`` (None: all equal), ties by
    the smallest row id (rows sorted by uid: the smallest uid)."""
    n = len(roots)
    score = np.zeros(n) if score is None else score
    rep = np.arange(n, dtype=np.int64)  # a row alone is its own root and representative
    grouped = np.flatnonzero(np.bincount(roots, minlength=n)[roots] > 1)
    order = grouped[np.lexsort((grouped, -score[grouped], roots[grouped]))]
    if len(order):
        r = roots[order]
        first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # first row of each root in that order
        rep[r[first]] = order[first]
    return rep
