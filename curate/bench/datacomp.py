"""DataComp's baselines against DataComp's own way of computing them, side by side in one run
(``python -m curate.bench datacomp``): the basic filter on the shards (curate indexes the tars while
DataComp reads the same rows' metadata), the basic filter on a 200k-row metadata pool, and the
basic, text-based and CLIP-score recipes on that pool; rows/s, ratios and whether the uids agree.
Target (issue 43): curate >= 1.5x DataComp's rows/s on metadata, >= 0.8x on shards."""
from __future__ import annotations

import json

import polars as pl

from curate.bench.common import bench_pool, save
from curate.bench.recipes import basic_vs_datacomp, metadata_basic_vs_datacomp, metadata_recipes


def run(rows: int = 200_000) -> dict:
    pool = bench_pool(10000, 10, seed=3)
    n = int(pl.read_parquet(pool / "ground_truth.parquet").height)
    res = {"shards_basic": basic_vs_datacomp(pool, n) | {"target": ">= 0.8"},
           "metadata_basic": metadata_basic_vs_datacomp(pool, rows),
           "metadata_recipes": metadata_recipes(pool, rows)}
    save("datacomp", res)
    for k, v in res.items():
        print(k, json.dumps(v))
    return res
