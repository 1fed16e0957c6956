"""A DataComp-style metadata pool with its .npz embeddings: the stages that read embeddings run on
it without images or a model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from curate.stages.reference_filter import save_reference
from tests.conftest import make_config, make_pipeline


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def npz_pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for k, n in enumerate((120, 80)):
        uids = [f"{k:04d}{i:028x}" for i in range(n)]
        pl.DataFrame({"uid": uids, "text": [f"a photo number {i} of a thing" for i in range(n)],
                      "original_width": [400] * n, "original_height": [300] * n}).write_parquet(out / f"{k:05d}.parquet")
        np.savez(out / f"{k:05d}.npz", l14_img=_unit(rng, n, 768), l14_txt=_unit(rng, n, 768),
                 b32_img=_unit(rng, n, 512), b32_txt=_unit(rng, n, 512))
    return out


def test_npz_embeddings_feed_clip_loss_and_normsim(npz_pool: Path, tmp_path: Path):
    target = np.load(npz_pool / "00000.npz")["l14_img"][:10].astype(np.float32)
    save_reference(target, {"model": "ViT-L-14", "pretrained": "openai"}, tmp_path / "target.npy")
    pipe = make_pipeline(("metadata_embeddings", {}),
                         ("clip_loss", {"embeddings_from": "metadata_embeddings", "batch_size": 64,
                                        "target": str(tmp_path / "target.npy")}),
                         ("clip_rank", {"scores_from": "clip_loss", "score_column": "negclip_loss", "top_fraction": 0.3}))
    work = tmp_path / "w"
    assert run_pipeline(pipe, make_config(str(npz_pool / "*.parquet"), work)).ok
    e = pl.read_parquet(work / "metadata_embeddings" / "00000.parquet")
    np.testing.assert_array_equal(np.array(e["image_emb"].to_list(), dtype=np.float16),
                                  np.load(npz_pool / "00000.npz")["l14_img"])
    t = pl.read_parquet(work / "clip_loss" / "*.parquet")
    assert t["negclip_loss"].null_count() == 0 and t.height == 200
    assert t.filter(pl.col("uid").str.starts_with("0000"))["normsim_inf"].sort(descending=True)[:10].min() > 0.99
    kept = pl.read_parquet(work / "clip_rank" / "*.parquet")["keep_clip_rank"].sum()
    assert kept == 60


def test_missing_or_wrong_npz_is_a_clear_shard_error(npz_pool: Path, tmp_path: Path):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(npz_pool, pool)
    (pool / "00001.npz").unlink()
    np.savez(pool / "00000.npz", l14_img=np.zeros((3, 768), np.float16), l14_txt=np.zeros((3, 768), np.float16))
    res = run_pipeline(make_pipeline(("metadata_embeddings", {})), make_config(str(pool / "*.parquet"), tmp_path / "w"))
    text = " ".join(res.problems())
    assert not res.ok and "no 00001.npz beside 00001.parquet" in text and "has shape (3, 768)" in text
    res = run_pipeline(make_pipeline(("metadata_embeddings", {"model": "ViT-B-32"})),
                       make_config(str(pool / "00000.parquet"), tmp_path / "w2"))
    assert not res.ok and "no array 'b32_img'" in " ".join(res.problems())


def test_an_embedding_reader_needs_a_stage_that_stores_them(npz_pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="stores none"):
        run_pipeline(make_pipeline(("text", {}), ("clip_loss", {"embeddings_from": "text"})),
                     make_config(str(npz_pool / "*.parquet"), tmp_path / "w"))


def test_the_classifier_needs_a_model_it_can_prompt(npz_pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="loads none"):
        run_pipeline(make_pipeline(("metadata_embeddings", {}), ("classifier", {"embeddings_from": "metadata_embeddings"})),
                     make_config(str(npz_pool / "*.parquet"), tmp_path / "w"))
