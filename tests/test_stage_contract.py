"""The stage contract: stage ids (two stages of one kind), declared reads that are part of the
fingerprint, in-memory stage runs, and global stages that own their summaries."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.core.config import ConfigError, PipelineConfig, StageSpec
from curate.models.clip import load_clip
from curate.runner.pipeline import run_pipeline, stage_fingerprints
from curate.contract.base import RunInfo, ShardContext, UndeclaredRead
from curate.runner.memory import run_in_memory
from curate.runner.registry import build_stages
from curate.stages.text import TextStage
from curate.report.stats import format_globals, funnel, global_summaries, load_stats
from tests.conftest import jpeg_bytes, make_config


def _ckpt(tmp: Path, seed: int) -> str:
    p = tmp / f"tiny-{seed}.pt"
    torch.save({"state_dict": load_clip("curate-tiny", None, seed=seed).model.state_dict()}, p)
    return str(p)


def _pipe(*stages: dict) -> PipelineConfig:
    return PipelineConfig(name="t", stages=[StageSpec(**s) for s in stages])


def test_two_clip_scorers_and_a_rank_by_either(pool: Path, tmp_path: Path):
    a, b = _ckpt(tmp_path, 0), _ckpt(tmp_path, 1)
    pipe = _pipe({"name": "clip_score", "id": "clip_a", "params": {"model": "curate-tiny", "pretrained": a}},
                 {"name": "clip_score", "id": "clip_b", "params": {"model": "curate-tiny", "pretrained": b,
                                                                   "all_rows": True}},
                 {"name": "clip_rank", "id": "rank_b", "params": {"scores_from": "clip_b", "top_fraction": 0.5}})
    work = tmp_path / "w"
    summary = run_pipeline(pipe, make_config(str(pool / "0000[01].tar"), work))
    assert summary.ok, summary.problems()
    sa = pl.read_parquet(work / "clip_a" / "*.parquet").select("uid", pl.col("clip_score").alias("a"))
    sb = pl.read_parquet(work / "clip_b" / "*.parquet").select("uid", pl.col("clip_score").alias("b"))
    rank = pl.read_parquet(work / "rank_b" / "*.parquet").select("uid", "keep_rank_b")
    d = sa.join(sb, on="uid").join(rank, on="uid").drop_nulls(["a", "keep_rank_b"])
    assert d.height > 50 and (d["a"] - d["b"]).abs().max() > 1e-3  # two different models
    # rank_b keeps the top half by clip_b's scores, whatever clip_a says
    kept = d.filter(pl.col("keep_rank_b"))
    assert kept.height == math.ceil(0.5 * d.height)
    assert kept["b"].min() >= d.filter(~pl.col("keep_rank_b"))["b"].max()
    glob = global_summaries(work)
    assert set(glob) == {"rank_b"}
    assert "scores of clip_b" in format_globals(glob, work)


def test_a_repeated_stage_kind_needs_ids():
    with pytest.raises(ConfigError, match="give each clip_score stage its own `id:`"):
        build_stages(_pipe({"name": "clip_score"}, {"name": "clip_score"}))


def test_a_read_of_a_missing_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="reads stage 'clip_x', which is not earlier"):
        build_stages(_pipe({"name": "clip_score"}, {"name": "clip_rank", "params": {"scores_from": "clip_x",
                                                                                   "top_fraction": 0.3}}))


def test_dedup_reads_what_the_pipeline_has_and_its_fingerprint_follows_them():
    with_image = build_stages(_pipe({"name": "image"}, {"name": "dedup"}))
    assert with_image[-1].reads() == ("image",)
    assert with_image[1].params.measures == ["phash"]  # the image stage computes what dedup reads
    alone = build_stages(_pipe({"name": "dedup"}))[-1]
    assert alone.reads() == () and alone.params.phash_from is None and alone.params.scores_from is None
    other = build_stages(_pipe({"name": "image", "params": {"thumb": 64}}, {"name": "dedup"}))
    fp_a = stage_fingerprints(with_image, ["s"])
    fp_b = stage_fingerprints(other, ["s"])
    assert fp_a[-1] != fp_b[-1]
    with pytest.raises(ConfigError, match="reads stage 'img'"):  # named explicitly: must exist
        build_stages(_pipe({"name": "dedup", "params": {"phash_from": "img"}}))


def test_a_stale_table_of_another_run_is_not_read(pool: Path, tmp_path: Path):
    """An image table left by an earlier pipeline does not leak into a dedup that lacks it."""
    work = tmp_path / "w"
    cfg = make_config(str(pool / "0000[01].tar"), work)
    assert run_pipeline(_pipe({"name": "image", "params": {"min_side": None, "max_aspect": None}},
                              {"name": "dedup", "params": {"phash_radius": 16}}), cfg).ok
    first = pl.read_parquet(work / "dedup" / "*.parquet")
    assert (first["reason_dedup"] == "dedup:phash").sum() > 0  # radius 16 merges a lot
    assert run_pipeline(_pipe({"name": "dedup", "params": {"phash_radius": 16}}), cfg).ok
    second = pl.read_parquet(work / "dedup" / "*.parquet")
    assert (second["reason_dedup"] == "dedup:phash").sum() == 0
    # a global stage's stats include its summarize step; its combine time is in the funnel
    stats = load_stats(work).filter(pl.col("stage") == "dedup")
    assert stats.filter(pl.col("metric") == "summarize_seconds").height == 2
    assert [r for r in funnel(work) if r["stage"] == "dedup"][0]["seconds"] > 0


def test_an_undeclared_read_is_refused(tmp_path: Path):
    ctx = ShardContext(shard_path="x.tar", shard="x", stage_id="mine", upstream=[], run=RunInfo("r", str(tmp_path)))
    with pytest.raises(UndeclaredRead, match="reads stage 'clip_score' but does not declare it"):
        ctx.read("clip_score", ["clip_score"])


def test_a_stage_runs_in_memory_on_a_handful_of_samples():
    jpg = jpeg_bytes()
    samples = [{"txt": "a photo of a red circle on a dark background", "jpg": jpg},
               {"txt": "IMG_1234.jpg", "jpg": jpg},
               {"txt": "ein rotes Quadrat auf einem dunklen Hintergrund", "jpg": jpg},
               {"txt": "no image at all"}]
    t = run_in_memory(TextStage(TextStage.Params(languages=None, min_words=4, min_alpha_ratio=0.5)),
                      samples).to_pylist()
    assert [r["reason_text"] for r in t[:3]] == [None, "caption:junk_filename", None]
    assert t[2]["lang"] == "de"
    assert t[3]["keep_text"] is None  # the index dropped it (no image): never evaluated
    assert t[0]["n_words"] == 10 and t[3]["n_words"] is None
    assert np.isclose(t[0]["alpha_ratio"], 1.0)
    assert t[0]["n_concepts"] is None  # no threshold reads it: not computed
