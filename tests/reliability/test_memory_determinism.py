from __future__ import annotations

import pytest

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

from curate.io.shards import make_uid
from curate.runner.pipeline import run_pipeline
from curate.tools.synth import synthesize
from tests.conftest import jpeg_bytes, make_config, make_pipeline, write_tar

RSS_BOUND_MB = 400


def _caption_shards(d: Path, n_shards: int, per: int = 10_000) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = jpeg_bytes((96, 96))
    for k in range(n_shards):
        members = []
        for i in range(per):
            key = f"{k:03d}{i:05d}"
            members += [(f"{key}.jpg", img), (f"{key}.txt", f"a photo number {i} of a red square".encode()),
                        (f"{key}.json", json.dumps({"uid": make_uid("mem", key)}).encode())]
        write_tar(d / f"{k:05d}.tar", members)
    return d


# A bare interpreter (no test helpers, which import torch through webdataset): what a worker holds.
_RUN = """
import sys
from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.runner.pipeline import run_pipeline
pipe = PipelineConfig(name="mem", stages=[StageSpec(name="text"), StageSpec(name="image", params={"min_side": None})])
cfg = RunConfig.model_validate({"input": sys.argv[1], "workdir": sys.argv[2], "executor": {"kind": "inprocess"},
                               "device": "cpu"})
s = run_pipeline(pipe, cfg)
assert s.ok, s.problems()
# VmHWM belongs to this process image; ru_maxrss would carry the forking pytest's peak.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""


def _peak_mb(inp: str, work: Path) -> float:
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _RUN, inp, str(work)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_bounded_and_independent_of_pool_size(tmp_path: Path, record):
    pool = _caption_shards(tmp_path / "pool", 3)
    one = _peak_mb(str(pool / "00000.tar"), tmp_path / "w1")
    three = _peak_mb(str(pool / "*.tar"), tmp_path / "w3")
    print(f"peak RSS: 1 shard of 10k samples {one:.0f} MB, 3 shards {three:.0f} MB (bound {RSS_BOUND_MB} MB)")
    assert one < RSS_BOUND_MB and three < RSS_BOUND_MB
    assert three < one * 1.15 + 30
    record(f"memory: 10k-sample shards, peak {one:.0f}/{three:.0f} MB (1/3 shards)", 2, 0, 0)


@pytest.mark.slow
def test_full_pipeline_decisions_identical_across_workers_and_shards(tmp_path: Path, tiny_ckpt: Path, record):
    synthesize(tmp_path / "p1", samples=400, shards=1, seed=31)
    synthesize(tmp_path / "p4", samples=400, shards=4, seed=31)
    pipe = make_pipeline(("text", {}), ("image", {"max_dominant_share": 0.97, "min_blur_var": 20.0}),
                         ("clip_score", {"model": "curate-tiny", "pretrained": str(tiny_ckpt), "batch_size": 32}),
                         ("clip_rank", {"top_fraction": 0.8}), ("dedup", {}),
                         ("balance", {"vocabulary": "imagenet21k", "case_sensitive": False, "target_size": 150,
                                      "unmatched": "keep"}))
    runs = {"a": ("p1", "inprocess"), "b": ("p1", "inprocess"), "c": ("p4", "local_cluster")}
    out = {}
    for name, (pool, kind) in runs.items():
        s = run_pipeline(pipe, make_config(str(tmp_path / pool / "*.tar"), tmp_path / name, kind=kind))
        assert s.ok, s.problems()
        frames = []
        for st in ("text", "image", "clip_rank", "dedup", "balance"):
            cols = ["uid", f"keep_{st}", f"reason_{st}"] + (["dup_of"] if st == "dedup" else [])
            frames.append(pl.read_parquet(tmp_path / name / st / "*.parquet", columns=cols).sort("uid"))
        out[name] = pl.concat(frames, how="align")
    assert out["a"].equals(out["b"]) and out["a"].equals(out["c"])
    assert out["a"]["keep_balance"].sum() > 0
    for f in (tmp_path / "a" / "dedup").glob("*.parquet"):  # same config twice: byte-identical files
        assert f.read_bytes() == (tmp_path / "b" / "dedup" / f.name).read_bytes()
    record("determinism: 2 identical runs + 4 shards on 2 workers", 3, 0, 0)
