"""Shared helpers for benchmarks: a cached synthetic pool, timing, peak RSS, result files."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from curate.tools.synth import POOL_VERSION, synthesize

log = logging.getLogger("curate.bench")
ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "work" / "bench"


def bench_pool(samples: int = 4000, shards: int = 4, seed: int = 1) -> Path:
    out = BENCH_DIR / f"pool-v{POOL_VERSION}-{samples}-{shards}-{seed}"
    if not (out / "ground_truth.parquet").exists():
        synthesize(out, samples=samples, shards=shards, seed=seed)
    return out


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(name: str, result: dict[str, Any]) -> None:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [f"== {name} =="] + [f"  {k}: {v}" for k, v in result.items()]
    print("\n".join(lines), flush=True)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
