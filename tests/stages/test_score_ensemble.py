from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import rankdata

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from tests.conftest import make_config, make_pipeline

TINY = {"model": "curate-tiny", "pretrained": None}


def _two_scorers(rule: str) -> list:
    # the tiny CLIP's score and the negCLIPLoss derived from it: two correlated, different scores
    return [("clip_score", TINY), ("clip_loss", {"batch_size": 32, "batches": 1}),
            ("score_ensemble", {"inputs": [{"stage": "clip_score"}, {"stage": "clip_loss", "column": "negclip_loss"}],
                                "rule": rule, "all_rows": True}),
            ("clip_rank", {"scores_from": "score_ensemble", "score_column": "ensemble_score", "top_fraction": 0.5})]


@pytest.mark.parametrize("rule", ["rank_mean", "zscore_min"])
def test_ensemble_equals_the_rule_computed_over_the_pool(pool: Path, tmp_path: Path, rule: str):
    work = tmp_path / rule
    assert run_pipeline(make_pipeline(*_two_scorers(rule)), make_config(str(pool / "*.tar"), work)).ok
    a = pl.read_parquet(work / "clip_score" / "*.parquet", columns=["uid", "clip_score", "keep_clip_score"])
    b = pl.read_parquet(work / "clip_loss" / "*.parquet", columns=["uid", "negclip_loss"])
    e = pl.read_parquet(work / "score_ensemble" / "*.parquet", columns=["uid", "ensemble_score"])
    every = a.join(b, on="uid").join(e, on="uid")
    # every row was asked; those the first scorer could not score (undecodable) get no ensemble score
    assert every.filter(~pl.col("keep_clip_score"))["ensemble_score"].null_count() == every.filter(
        ~pl.col("keep_clip_score")).height > 0
    d = every.filter(pl.col("keep_clip_score")).sort("uid")
    x, y = (d[c].to_numpy().astype(np.float64) for c in ("clip_score", "negclip_loss"))  # stored as float32
    if rule == "rank_mean":
        want = ((rankdata(x) - 1) + (rankdata(y) - 1)) / 2 / (len(x) - 1)
    else:
        want = np.minimum((x - x.mean()) / x.std(ddof=1), (y - y.mean()) / y.std(ddof=1))
    np.testing.assert_allclose(d["ensemble_score"].to_numpy(), want, rtol=1e-6, atol=1e-9)
    rank = pl.read_parquet(work / "clip_rank" / "*.parquet", columns=["uid", "keep_clip_rank"]).join(e, on="uid")
    kept = rank.filter(pl.col("keep_clip_rank"))
    assert kept.height == -(-d.height // 2) and kept["ensemble_score"].min() >= rank.filter(
        ~pl.col("keep_clip_rank") & pl.col("ensemble_score").is_not_null())["ensemble_score"].max()


def test_mistakes_are_named_before_any_work(pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="inputs"):
        run_pipeline(make_pipeline(("clip_score", TINY), ("score_ensemble", {"inputs": [{"stage": "clip_score"}]})),
                     make_config(str(pool / "*.tar"), tmp_path / "a"))
    with pytest.raises(ConfigError, match="not earlier"):
        run_pipeline(make_pipeline(("clip_score", TINY), ("score_ensemble", {
            "inputs": [{"stage": "clip_score"}, {"stage": "clip_l14"}]})), make_config(str(pool / "*.tar"), tmp_path / "b"))
