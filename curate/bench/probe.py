"""Tiny functions shipped to Dask workers by benchmarks; importing this module loads nothing heavy."""
from __future__ import annotations


def rss_mb() -> float:
    """Resident memory of the calling process (ru_maxrss would include the forking parent's)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def identity(x):
    return x
