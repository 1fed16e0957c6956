"""Fused map stages against the same stages run one after another, side by side in one process.

The map stages of ``pipelines/demo.yaml`` (index, text, image, clip_score; the tiny CLIP with
random weights: the cost of a forward does not depend on the weights) on a synthetic pool:
end-to-end samples/s, tar bytes read per shard byte (the stages' own ``bytes_read`` counts, which
miss the CLIP loader's reads, and the process's ``rchar``: every byte read() returned, Parquet
tables and model files included), and whether both runs wrote the same tables.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import yaml

from curate.bench.common import BENCH_DIR, ROOT, bench_pool, save, timer
from curate.core.config import PipelineConfig, RunConfig
from curate.core.pipeline import run_pipeline


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


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


def run(samples: int = 4000, shards: int = 4) -> dict:
    import torch

    from curate.models.clip import load_clip

    pool = bench_pool(samples, shards, seed=5)
    ckpt = BENCH_DIR / "fusion-tiny.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save({"state_dict": load_clip("curate-tiny", None).model.state_dict()}, ckpt)
    pipe = _map_stages(ckpt)
    shard_bytes = sum(p.stat().st_size for p in pool.glob("*.tar"))
    res: dict = {"samples": samples, "shards": shards, "shard_mb": round(shard_bytes / 2**20, 1)}
    works = {}
    for fuse in (False, True, False, True):  # alternated: page cache and warm-up fall on both
        name = "fused" if fuse else "unfused"
        work = BENCH_DIR / f"fusion-{name}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = RunConfig.model_validate({"input": str(pool / "*.tar"), "workdir": str(work), "device": "cpu",
                                        "executor": {"kind": "inprocess", "retries": 0, "fuse": fuse}})
        r0 = _rchar()
        with timer() as t:
            s = run_pipeline(pipe, cfg)
        assert s.ok, s.problems()
        stats = pl.read_parquet(work / "stats" / "**" / "*.parquet")
        counted = float(stats.filter(pl.col("metric") == "bytes_read")["value"].sum())
        res[name] = {"seconds": round(t["seconds"], 2), "samples_per_s": round(samples / t["seconds"]),
                     "stage_bytes_read_per_shard_byte": round(counted / shard_bytes, 2),
                     "rchar_per_shard_byte": round((_rchar() - r0) / shard_bytes, 2)}
        works[name] = work
    res["speedup_fused_over_unfused"] = round(res["fused"]["samples_per_s"] / res["unfused"]["samples_per_s"], 2)
    res["target"] = "fused >= 1.3x unfused; bytes read per shard byte = 1.0"
    res["same_tables"] = all(_tables_equal(works["fused"], works["unfused"], st)
                             for st in ("index", "text", "image", "clip_score"))
    save("fusion", res)
    print(json.dumps(res))
    return res
