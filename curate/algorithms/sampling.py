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
