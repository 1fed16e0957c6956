"""Shards on object storage against the same shards on local disk: the index and text stages in the
same process, the pool read from an S3-protocol server (moto's server, its own process on
127.0.0.1) or from disk, runs alternated. Target: S3 samples/s >= 0.8x local. A third side puts
the work dir in the bucket too (every table, stats file and run record uploaded). Also the tar
bytes the stages read per shard byte on each side (the stats' ``bytes_read``).

moto keeps objects in memory and serves them over HTTP like S3 does (range reads, multipart), so
the figure is the cost of curate's remote read path (fsspec, s3fs, read-ahead), not of a network.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl

from curate.bench.common import BENCH_DIR, bench_pool, save, timer
from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.runner.pipeline import run_pipeline
from curate.io.parquet import read_frame
from curate.io.storage import set_storage_options

BUCKET = "curate-bench"
PIPE = PipelineConfig(name="storage_bench", stages=[StageSpec(name="text", params={})])


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@contextmanager
def moto_pool(tars: list[Path], prefix: str) -> Iterator[str]:
    """An S3-protocol server (moto, its own process) holding ``tars`` under
    ``s3://BUCKET/prefix/``: yields its endpoint, stops the server on exit."""
    import s3fs

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    proc, endpoint = _moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        for p in tars:
            fs.put(str(p), f"{BUCKET}/{prefix}/{p.name}")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _run(inputs: str, work, endpoint: str) -> float:
    if str(work).startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        if fs.exists(str(work)):
            fs.rm(str(work), recursive=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    cfg = RunConfig.model_validate({"input": inputs, "workdir": str(work), "device": "cpu",
                                    "executor": {"kind": "inprocess", "retries": 0},
                                    "storage_options": {"s3": {"endpoint_url": endpoint}}})
    with timer() as t:
        s = run_pipeline(PIPE, cfg)
    assert s.ok, s.problems()
    return t["seconds"]


def _bytes_read_per_shard_byte(work, shard_bytes: int) -> float:
    stats = pl.read_parquet(work / "stats" / "*" / "*.parquet")
    return round(stats.filter(pl.col("metric") == "bytes_read")["value"].sum() / shard_bytes, 3)


def run(samples: int = 4000, repeats: int = 3) -> dict:
    pool = bench_pool(samples)
    tars = sorted(pool.glob("*.tar"))
    shard_bytes = sum(p.stat().st_size for p in tars)
    with moto_pool(tars, "pool") as endpoint:
        try:
            local_w, remote_w = BENCH_DIR / "storage-local", BENCH_DIR / "storage-s3"
            _run(str(pool / "*.tar"), local_w, endpoint)  # warm: page cache, fastText load
            bucket_w = f"s3://{BUCKET}/work"
            local, remote, all_remote = [], [], []
            for _ in range(repeats):
                local.append(_run(str(pool / "*.tar"), local_w, endpoint))
                remote.append(_run(f"s3://{BUCKET}/pool/*.tar", remote_w, endpoint))
                all_remote.append(_run(f"s3://{BUCKET}/pool/*.tar", bucket_w, endpoint))
            set_storage_options({"s3": {"endpoint_url": endpoint}})
            same = all(pl.read_parquet(local_w / st / "*.parquet").equals(pl.read_parquet(remote_w / st / "*.parquet"))
                       and pl.read_parquet(local_w / st / "*.parquet").equals(read_frame(f"{bucket_w}/{st}/*.parquet"))
                       for st in ("index", "text"))
            res = {"samples": samples, "shards": len(tars), "shard_mb": round(shard_bytes / 2**20, 1),
                   "stages": "index + text", "local_s_best": round(min(local), 2), "s3_s_best": round(min(remote), 2),
                   "local_samples_per_s": round(samples / min(local)), "s3_samples_per_s": round(samples / min(remote)),
                   "ratio_s3_over_local": round(min(local) / min(remote), 3), "target": ">= 0.8",
                   "s3_workdir_s_best": round(min(all_remote), 2),
                   "ratio_s3_input_and_workdir_over_local": round(min(local) / min(all_remote), 3),
                   "bytes_read_per_shard_byte_local": _bytes_read_per_shard_byte(local_w, shard_bytes),
                   "bytes_read_per_shard_byte_s3": _bytes_read_per_shard_byte(remote_w, shard_bytes),
                   "same_tables": same, "runs_local_s": [round(x, 2) for x in local],
                   "runs_s3_s": [round(x, 2) for x in remote], "runs_s3_workdir_s": [round(x, 2) for x in all_remote]}
        finally:
            set_storage_options({})
    save("storage", res)
    return res
