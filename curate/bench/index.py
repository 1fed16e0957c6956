"""Index stage throughput against a plain tarfile loop over the same tars (target >= 0.8), and
our own tar reader alone (the index stage's read path) for reference."""
from __future__ import annotations

import shutil
import tarfile

from curate.bench.common import BENCH_DIR, bench_pool, save, timer
from curate.core.config import StageSpec
from curate.io.shards import Shard, expand_input, iter_samples
from curate.contract.base import RunInfo
from curate.runner.execute import StageTask, run_shard


def raw_tar_loop(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with tarfile.open(p, "r|") as tf:
            for m in tf:
                f = tf.extractfile(m)
                if f is not None:
                    f.read()
                    n += 1
    return n


def reader_pass(paths: list[str]) -> int:
    """Our tar reader alone (what every stage streams through), for reference."""
    return sum(1 for p in paths for _ in iter_samples(p))


def run(samples: int = 4000) -> dict:
    pool = bench_pool(samples)
    paths = expand_input(str(pool / "*.tar"))
    work = BENCH_DIR / "index-work"
    raw_tar_loop(paths)  # warm the page cache for both sides
    best = {"raw": 0.0, "index": 0.0, "reader": 0.0}
    for _ in range(3):
        with timer() as t:
            members = raw_tar_loop(paths)
        best["raw"] = max(best["raw"], samples / t["seconds"])
        with timer() as t:
            reader_pass(paths)
        best["reader"] = max(best["reader"], samples / t["seconds"])
        shutil.rmtree(work, ignore_errors=True)
        task = StageTask(spec=StageSpec(name="index"), stage_id="index", upstream=(), fingerprint="bench",
                         run=RunInfo(run_id="bench", workdir=str(work)))
        with timer() as t:
            for p in paths:
                run_shard(task, Shard.at(p))
        best["index"] = max(best["index"], samples / t["seconds"])
    res = {"samples": samples, "tar_members": members, "raw_tarfile_samples_per_s": round(best["raw"]),
           "curate_reader_samples_per_s": round(best["reader"]),
           "index_samples_per_s": round(best["index"]), "ratio": round(best["index"] / best["raw"], 3),
           "target_ratio": 0.8}
    save("index", res)
    return res
