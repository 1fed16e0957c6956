"""One measured operation per process (``python -m curate.bench.kinds KIND N``), so that the peak
memory (VmHWM of this process image) belongs to that operation alone. Prints one JSON line."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from curate.algorithms.vectors import train_centroids


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


def _unit(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    """n unit vectors around n/50 centres (float16 on disk, as stored), returned as float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 50), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.6, size=(n, d)).astype(np.float32)
    dup = rng.permutation(n)[: n // 20]  # 5 % near-copies of another vector
    x[dup] = x[rng.integers(0, n, len(dup))] + rng.normal(scale=0.01, size=(len(dup), d)).astype(np.float32)
    x = x.astype(np.float16).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(n: int) -> dict:
    import polars as pl

    from curate.algorithms.exact_keys import equal_key_pairs

    rng = np.random.default_rng(0)
    keys = rng.integers(0, int(n * 0.9), n)  # ~10 % duplicates
    df = pl.DataFrame({"sha256": [f"{k:064x}" for k in keys]})
    t0 = time.perf_counter()
    pairs = equal_key_pairs(df, ["sha256"])
    return {"seconds": time.perf_counter() - t0, "pairs": len(pairs)}


def planted_hashes(n: int, radius: int = 4, share: float = 0.1) -> tuple[np.ndarray, int]:
    """``n`` 64-bit hashes: random, with ``share`` of them copies of another hash with 1 to
    ``radius + 1`` bits flipped (the last just outside the radius). Returns the hashes and how
    many copies lie within the radius of their original."""
    rng = np.random.default_rng(0)
    h = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    copies = rng.choice(n, int(n * share), replace=False)
    flips = rng.integers(1, radius + 2, len(copies))
    for i, f in zip(copies.tolist(), flips.tolist()):
        src = int(rng.integers(n))
        bits = rng.choice(64, f, replace=False)
        v = int(h[src]) & (2**64 - 1)
        for b in bits.tolist():
            v ^= 1 << b
        h[i] = v - 2**64 if v >= 2**63 else v
    return h, int((flips <= radius).sum())


def _pair_digest(pairs: np.ndarray) -> str:
    import hashlib

    p = np.unique(np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1), axis=0)
    return hashlib.blake2b(p.tobytes(), digest_size=8).hexdigest()


def phash_banded(n: int, radius: int = 4) -> dict:
    from curate.algorithms.phash import near_pairs

    h, planted = planted_hashes(n, radius)
    t0 = time.perf_counter()
    pairs = near_pairs(h, radius)
    return {"seconds": time.perf_counter() - t0, "pairs": len(pairs), "planted_within_radius": planted,
            "pairs_digest": _pair_digest(pairs)}


def phash_brute(n: int, radius: int = 4) -> dict:
    from curate.algorithms.phash import brute_force_pairs

    h, planted = planted_hashes(n, radius)
    t0 = time.perf_counter()
    pairs = brute_force_pairs(h, radius)
    return {"seconds": time.perf_counter() - t0, "pairs": len(pairs), "planted_within_radius": planted,
            "pairs_digest": _pair_digest(pairs)}


def semantic(n: int) -> dict:
    """SemDeDup core as the stage runs it: top-level k-means on a 200k sample, assignment, then
    clusters split to at most 1,000 rows and searched exhaustively."""
    from curate.algorithms.semdedup import semantic_pairs_in_memory

    x = _unit(n)
    t0 = time.perf_counter()
    pairs, k = semantic_pairs_in_memory(x, 0.95, 1000)
    return {"seconds": time.perf_counter() - t0, "pairs": len(pairs), "clusters": k}


def semantic_brute(n: int) -> dict:
    """Every pair above the threshold by exhaustive search, and the share the clustered search finds."""
    from curate.algorithms.semdedup import semantic_pairs_in_memory

    x = _unit(n)
    t0 = time.perf_counter()
    found = []
    for s in range(0, n, 2048):
        i, j = np.nonzero(x[s:s + 2048] @ x.T > 0.95)
        keep = s + i < j
        found.append(np.stack([s + i[keep], j[keep]], axis=1))
    brute = np.concatenate(found)
    brute_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs, k = semantic_pairs_in_memory(x, 0.95, 1000)
    clustered_s = time.perf_counter() - t0
    common = len(set(map(tuple, brute.tolist())) & set(map(tuple, pairs.tolist())))
    return {"seconds": brute_s, "clustered_seconds": clustered_s, "pairs_exhaustive": len(brute),
            "pairs_clustered": len(pairs), "recall": common / max(1, len(brute)), "clusters": k}


def kmeans(n: int) -> dict:
    import faiss

    x = _unit(n)
    k = max(8, int(np.sqrt(n) / 2))
    t0 = time.perf_counter()
    cent = train_centroids(x[np.random.default_rng(1).permutation(n)[:500_000]], k, seed=0)  # as the stage trains
    train_s = time.perf_counter() - t0
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(cent)
    # our assignment path on what the stage reads: a float16 fixed-size list column
    import pyarrow as pa

    from curate.stages.reference_filter import nearest_centroids

    col = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1), pa.float16()), x.shape[1])
    best = {"faiss": float("inf"), "blas": float("inf"), "ours": float("inf")}
    runs = {"faiss": lambda: index.search(x, 1),  # the raw faiss flat search, float32 in memory
            "blas": lambda: np.argmax(x @ cent.T, axis=1),  # the raw product our path sits on
            "ours": lambda: nearest_centroids(cent, col)}
    for _ in range(3):  # best of three, alternating, so no side gets the warm-up
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    _, faiss_ids = index.search(x[:20_000], 1)
    agree = float((nearest_centroids(cent, col.slice(0, 20_000))[0] == faiss_ids[:, 0]).mean())
    return {"seconds": train_s, "centroids": k, "assign_faiss_per_s": n / best["faiss"],
            "assign_raw_blas_per_s": n / best["blas"], "assign_ours_per_s": n / best["ours"],
            "assign_ratio": best["faiss"] / best["ours"], "assign_ratio_vs_raw_blas": best["blas"] / best["ours"],
            "agreement_with_faiss": agree}


def balance(n: int) -> dict:
    import polars as pl

    from curate.algorithms.sampling import uniform_hash
    from curate.stages.balance import keep_probability

    rng = np.random.default_rng(0)
    n_entries = 20_000
    zipf = rng.zipf(1.3, size=n * 3) % n_entries  # head-heavy concept matches
    rows = np.repeat(np.arange(n), 3)
    t0 = time.perf_counter()
    entries = pl.DataFrame({"row": rows, "entry": zipf})
    counts = np.bincount(zipf, minlength=n_entries).astype(np.float64)
    lo, hi = 1e-6, counts.max()
    target = n // 3
    for _ in range(40):
        mid = (lo + hi) / 2
        if keep_probability(entries, counts, mid)["p_keep"].sum() < target:
            lo = mid
        else:
            hi = mid
    pk = keep_probability(entries, counts, hi).sort("row")["p_keep"].to_numpy()
    coin = np.array([uniform_hash(f"{i:032x}", 0) for i in range(n)])
    kept = int((coin < pk).sum())
    return {"seconds": time.perf_counter() - t0, "t": hi, "kept": kept}


KINDS = {"exact": exact, "phash_banded": phash_banded, "phash_brute": phash_brute, "semantic": semantic,
         "semantic_brute": semantic_brute,
         "kmeans": kmeans, "balance": balance}

if __name__ == "__main__":
    res = KINDS[sys.argv[1]](int(sys.argv[2]))
    res["peak_mb"] = round(_hwm_mb(), 1)
    print(json.dumps(res))
