"""`make compare`'s recipes and the models it makes for them (the quality head)."""
from __future__ import annotations

import pytest

from pathlib import Path

import numpy as np
import polars as pl

from curate.models.clip import embed_dim
from curate.stages.embedding_head import load_head
from curate.runner.registry import build_stages
from curate.tools.compare import recipes
from curate.tools.quality_head import BAD_LABELS, fit_logistic, train_quality_head
from tests.conftest import make_config, shared_data

TINY = {"model": "curate-tiny", "pretrained": None, "batch_size": 64}


def test_every_compared_recipe_builds(tmp_path: Path):
    """Each row's pipeline passes the stage registry's checks (typed params, stage inputs that
    exist, ids unique): a broken recipe fails here, not after an hour of `make compare`."""
    chosen = recipes(tmp_path / "heldout", tmp_path / "models")
    assert {"no_filter", "ensemble_top30", "quality_head", "caption_dedup", "metaclip_en",
            "metaclip2_multilingual", "tmars_top30", "nsfw", "recaption_rescue", "full"} <= set(chosen)
    for name, pipe in chosen.items():
        ids = [s.stage_id for s in build_stages(pipe, name)]
        assert ids[0] == "index", name
    ens = [s for s in chosen["ensemble_top30"].stages if s.name == "clip_score"]
    assert len({s.params["pretrained"] for s in ens}) == 2  # two different scorers
    multi = {s.name: s.params for s in chosen["metaclip2_multilingual"].stages}
    english = {s.name: s.params for s in chosen["metaclip_en"].stages}
    assert multi["text"]["languages"] is None and multi["balance"]["per_language"]
    assert english["text"]["languages"] == ["en"] and not english["balance"]["per_language"]


def test_logistic_head_is_balanced_and_repeatable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 8))
    y = (x[:, 0] + 0.1 * x[:, 1] > 1.6).astype(float)  # about 5 % positives
    w, b = fit_logistic(x, y)
    pred = x @ w + b > 0
    assert 0.02 < y.mean() < 0.1
    assert pred[y > 0].mean() > 0.9 and (~pred[y == 0]).mean() > 0.9  # both classes, not the majority only
    w2, b2 = fit_logistic(x, y)
    assert np.array_equal(w, w2) and b == b2


@pytest.mark.slow
def test_quality_head_runs_as_an_embedding_head(tmp_path: Path):
    """The head is fitted on a labelled synthetic pool's stored embeddings and loads as a user's
    checkpoint; blank and blurry images score lower than clean ones on that pool."""
    from curate.core.config import PipelineConfig, StageSpec
    from curate.runner.pipeline import run_pipeline

    cfg = make_config("unused", tmp_path / "unused")
    path = train_quality_head(tmp_path / "head", cfg, TINY, samples=300)
    _, shapes = load_head(str(path), "none", "sigmoid")
    assert shapes == [(1, embed_dim("curate-tiny"))]
    assert train_quality_head(tmp_path / "head", cfg, TINY, samples=300) == path  # reused
    pool = tmp_path / "head" / "pool"
    pipe = PipelineConfig(name="q", stages=[
        StageSpec(name="clip_score", params=dict(TINY, all_rows=True)),
        StageSpec(name="embedding_head", id="quality", params={"checkpoint": str(path), "output": "sigmoid"})])
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "w")).ok
    scores = pl.read_parquet(tmp_path / "w" / "quality" / "*.parquet", columns=["uid", "head_score"]).join(
        pl.read_parquet(pool / "ground_truth.parquet", columns=["uid", "label"]), on="uid")
    bad = scores.filter(pl.col("label").is_in(BAD_LABELS))["head_score"].mean()
    clean = scores.filter(pl.col("label") == "clean")["head_score"].mean()
    assert bad < 0.5 < clean


@pytest.mark.slow
def test_every_compared_recipe_runs_on_real_photos(tmp_path: Path, tiny_ckpt: Path):
    """Each `make compare` recipe (the newer methods included) on 159 COCO photos with their
    captions: every sample gets a decision, every dropped one a reason. Random tiny CLIP weights
    stand in for the trained scorers (the run, not the ranking, is under test)."""
    import shutil

    from curate.report.decisions import decisions
    from curate.runner.pipeline import run_pipeline
    from curate.tools.compare import SECOND_SCORER
    from curate.tools.demo import SCORER
    from curate.tools.synth import synthesize

    shard = shared_data("shards/coco-val2017-mini-000000.tar")
    models = tmp_path / "models"
    models.mkdir()
    for name in (SCORER, f"{SECOND_SCORER}.pt"):
        shutil.copy(tiny_ckpt, models / name)
    import torch

    from curate.models.clip import load_clip
    from curate.tools.captioning import CAPTIONER

    torch.save({"state_dict": load_clip("curate-tiny-coca", None).model.state_dict()}, models / f"{CAPTIONER}.pt")
    heldout = tmp_path / "heldout"
    synthesize(heldout, samples=120, shards=1, seed=2000, fractions={})
    cfg = make_config(str(shard), tmp_path / "unused").model_copy(update={"model_cache": str(models)})
    train_quality_head(models / "quality_head", cfg, dict(TINY, pretrained=str(tiny_ckpt)), samples=300)
    for name, pipe in recipes(heldout, models).items():
        work = tmp_path / "w" / name
        s = run_pipeline(pipe, cfg.model_copy(update={"workdir": str(work)}))
        assert s.ok, (name, s.problems())
        d = decisions(work)
        assert d.height == 159, name
        dropped = d.filter(~pl.col("kept"))
        assert dropped["reason"].null_count() == 0, name
