"""Caption near-duplicates: curate's banded pair search against datasketch's MinHashLSH (insert
every signature, query every signature) on the same signatures, and the signature cost itself.

Captions: 10 % of them are made from 200 templates ("... item 01234"), the rest random word
sequences, so near duplicates exist in groups of various sizes.
"""
from __future__ import annotations

import numpy as np

from curate.algorithms.components import component_roots
from curate.algorithms.minhash import SEED, shingles, signatures, similar_pairs
from curate.bench.common import peak_rss_mb, save, timer

THRESHOLD = 0.7


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"word{i}" for i in range(5000)]
    templates = [" ".join(rng.choice(words, 8)) + " item {:05d}" for _ in range(200)]
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append(templates[int(rng.integers(len(templates)))].format(int(rng.integers(100_000))))
        else:
            out.append(" ".join(rng.choice(words, int(rng.integers(5, 15)))))
    return out


def run(n: int = 100_000) -> dict:
    from datasketch import MinHash, MinHashLSH

    caps = captions(n)
    with timer() as t_sig:
        sig = np.array(signatures(caps, 5, 128), dtype=np.uint32)
    mh = MinHash.bulk([shingles(c, 5) for c in caps], num_perm=128, seed=SEED)  # the same signatures
    with timer() as t_ours:
        ours = similar_pairs(sig, THRESHOLD)
    with timer() as t_lsh:
        lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
        for i, m in enumerate(mh):
            lsh.insert(i, m)
        theirs = set()
        for i, m in enumerate(mh):
            for j in lsh.query(m):
                if j > i and m.jaccard(mh[j]) >= THRESHOLD:
                    theirs.add((i, j))
    # ours chains each LSH bucket to its first row instead of listing every pair: compare the
    # duplicate groups (connected components) the two edge lists give
    theirs_arr = np.array(sorted(theirs), dtype=np.int64).reshape(-1, 2)
    groups_ours, groups_theirs = component_roots(n, ours), component_roots(n, theirs_arr)
    res = {"captions": n, "threshold": THRESHOLD,
           "signatures_per_s": round(n / t_sig["seconds"]),
           "curate_pairs_s": round(t_ours["seconds"], 2), "datasketch_lsh_pairs_s": round(t_lsh["seconds"], 2),
           "speedup": round(t_lsh["seconds"] / t_ours["seconds"], 1),
           "edges_curate": len(ours), "pairs_datasketch": len(theirs),
           "rows_in_groups_curate": int((np.bincount(groups_ours, minlength=n)[groups_ours] > 1).sum()),
           "rows_in_groups_datasketch": int((np.bincount(groups_theirs, minlength=n)[groups_theirs] > 1).sum()),
           "same_groups": bool(np.array_equal(groups_ours, groups_theirs)),
           "peak_rss_mb": round(peak_rss_mb())}
    save("caption_dedup", res)
    return res
