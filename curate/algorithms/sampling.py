"""Samples drawn by uid, not by shard: a row is in when ``hash(uid, seed) < p``, so the same rows are
drawn (and, ordered by uid, in the same order) whatever the sharding and the number of workers."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def uniform_hash(uid: str, seed: int) -> float:
    """A uniform [0, 1) number from (uid, seed): the coin of every sampling decision."""
    h = hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def uid_sample(uids: Sequence[str], seed: int, share: float) -> np.ndarray:
    """Which of ``uids`` a sample of about ``share`` of the pool holds (a boolean mask)."""
    if share >= 1.0:
        return np.ones(len(uids), dtype=bool)
    return np.fromiter((uniform_hash(u, seed) < share for u in uids), dtype=bool, count=len(uids))


def sample_share(wanted: int, pool: int) -> float:
    """The share of a pool of ``pool`` rows that draws about ``wanted`` of them (all when fewer)."""
    return min(1.0, wanted / pool) if pool else 1.0


def uid_keys(uids: Sequence[str], seed: int) -> np.ndarray:
    """One uniform 64-bit key per uid (uint64), from (uid, seed): the root of every per-row random
    choice that must not depend on the sharding (see ``round_keys``)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest(), "little")
                        for u in uids), dtype=np.uint64, count=len(uids))


def round_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """Independent uniform keys for round ``k`` from the per-row keys (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = keys + np.uint64((k + 1) * 0x9E3779B97F4A7C15 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def bucket(keys: np.ndarray, k: int, buckets: int) -> np.ndarray:
    """The bucket (0 .. buckets-1) of each row in round ``k``: a random partition of the pool into
    ``buckets`` parts of about equal size, the same for a row wherever it lies."""
    u = (round_keys(keys, k) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.minimum((u * buckets).astype(np.int64), buckets - 1)
