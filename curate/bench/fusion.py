"""Fused map stages against the same stages run one after another, side by side.

The map stages of ``pipelines/demo.yaml`` (index, text, image, clip_score; the tiny CLIP with
random weights: the cost of a forward does not depend on the weights) on a synthetic pool, three
ways: local disk in this process, local disk on the demo's Dask LocalCluster (two one-thread
workers), and an S3-protocol server (moto's, its own process on 127.0.0.1) in this process. Each
gives end-to-end samples/s, bytes read per shard byte, and whether both runs wrote the same tables.
Local reads in this process are counted by ``rchar`` (every byte read() returned, Parquet tables
and model files included); S3 reads by the loopback interface's received bytes (requests and
responses), since socket reads are not in ``rchar``. The stages' own ``bytes_read`` counts miss
the CLIP loader's reads and are given for every side.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import yaml

from curate.bench.common import BENCH_DIR, ROOT, bench_pool, save, timer
from curate.core.config import PipelineConfig, RunConfig
from curate.runner.pipeline import run_pipeline


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _loopback_bytes() -> int | None:
    """Bytes received on the loopback interface (all processes of this network namespace)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    return None


def _map_stages(ckpt: Path) -> PipelineConfig:
    demo = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    stages = [s for s in demo["stages"] if s["name"] in ("text", "image", "clip_score")]
    for s in stages:
        if s["name"] == "clip_score":
            s["params"] = s["params"] | {"pretrained": str(ckpt)}
    return PipelineConfig.model_validate({"name": "demo-map-stages", "stages": stages})


def _tables_equal(a: Path, b: Path, stage: str) -> bool:
    files = sorted(p.name for p in (a / stage).glob("*.parquet"))
    return bool(files) and all(pl.read_parquet(a / stage / f).equals(pl.read_parquet(b / stage / f)) for f in files)


def _side(pipe: PipelineConfig, inputs: str, samples: int, shard_bytes: int, endpoint: str | None,
          executor: dict) -> dict:
    """Unfused and fused runs of ``pipe`` over ``inputs``, alternated so that the page cache and
    warm-up fall on both; each side's figures are its faster run."""
    where = ("s3" if endpoint else "local") + "-" + executor["kind"]
    storage = {"storage_options": {"s3": {"endpoint_url": endpoint}}} if endpoint else {}
    res: dict = {}
    works = {}
    for fuse in (False, True, False, True):
        name = "fused" if fuse else "unfused"
        work = BENCH_DIR / f"fusion-{where}-{name}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = RunConfig.model_validate({"input": inputs, "workdir": str(work), "device": "cpu", **storage,
                                        "executor": executor | {"retries": 0, "fuse": fuse}})
        r0, lo0 = _rchar(), _loopback_bytes()
        with timer() as t:
            s = run_pipeline(pipe, cfg)
        assert s.ok, s.problems()
        r1, lo1 = _rchar(), _loopback_bytes()
        stats = pl.read_parquet(work / "stats" / "**" / "*.parquet")
        counted = float(stats.filter(pl.col("metric") == "bytes_read")["value"].sum())
        run = {"seconds": round(t["seconds"], 2), "samples_per_s": round(samples / t["seconds"]),
               "stage_bytes_read_per_shard_byte": round(counted / shard_bytes, 2)}
        if endpoint and lo0 is not None:
            run["loopback_bytes_per_shard_byte"] = round((lo1 - lo0) / shard_bytes, 2)
        elif executor["kind"] == "inprocess":  # a Dask worker's reads are not this process's
            run["rchar_per_shard_byte"] = round((r1 - r0) / shard_bytes, 2)
        if name not in res or run["seconds"] < res[name]["seconds"]:
            res[name] = run
        works[name] = work
    res["speedup_fused_over_unfused"] = round(res["fused"]["samples_per_s"] / res["unfused"]["samples_per_s"], 2)
    res["same_tables"] = all(_tables_equal(works["fused"], works["unfused"], st)
                             for st in ("index", "text", "image", "clip_score"))
    return res


def run(samples: int = 4000, shards: int = 4) -> dict:
    import torch

    from curate.bench.storage import BUCKET, moto_pool
    from curate.models.clip import load_clip

    pool = bench_pool(samples, shards, seed=5)
    ckpt = BENCH_DIR / "fusion-tiny.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save({"state_dict": load_clip("curate-tiny", None).model.state_dict()}, ckpt)
    pipe = _map_stages(ckpt)
    tars = sorted(pool.glob("*.tar"))
    shard_bytes = sum(p.stat().st_size for p in tars)
    res: dict = {"samples": samples, "shards": shards, "shard_mb": round(shard_bytes / 2**20, 1),
                 "target": "fused >= 1.3x unfused; bytes read per shard byte = 1.0"}
    inprocess = {"kind": "inprocess"}
    res["local"] = _side(pipe, str(pool / "*.tar"), samples, shard_bytes, None, inprocess)
    # the demo's executor (configs/local.yaml): two Dask worker processes of one thread each
    res["local_cluster"] = _side(pipe, str(pool / "*.tar"), samples, shard_bytes, None,
                                 {"kind": "local_cluster", "n_workers": 2, "threads_per_worker": 1,
                                  "dashboard": False})
    with moto_pool(tars, "fusion-pool") as endpoint:
        res["s3"] = _side(pipe, f"s3://{BUCKET}/fusion-pool/*.tar", samples, shard_bytes, endpoint, inprocess)
    save("fusion", res)
    print(json.dumps(res))
    return res
