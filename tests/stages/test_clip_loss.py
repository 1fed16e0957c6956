from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from curate.algorithms.sampling import uid_keys
from curate.stages.clip_loss import neg_clip_loss, norm_sim
from curate.stages.reference_filter import save_reference
from tests.conftest import make_config, make_pipeline

TINY = {"model": "curate-tiny", "pretrained": None}


def _unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_neg_clip_loss_is_minus_tau_times_the_clip_loss_of_the_batch():
    """One batch holding every pair: -tau * (per-pair symmetric cross-entropy, as CLIP trains)
    plus tau * log(batch size), the log-mean-exp shift."""
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 300), _unit(rng, 300)
    tau = 0.05
    ours = neg_clip_loss(img, txt, uid_keys([str(i) for i in range(300)], 1), tau, batch_size=1000, batches=1)
    logits = torch.from_numpy(img).double() @ torch.from_numpy(txt).double().T / tau
    target = torch.arange(300)
    ce = (torch.nn.functional.cross_entropy(logits, target, reduction="none")
          + torch.nn.functional.cross_entropy(logits.T, target, reduction="none")) / 2
    np.testing.assert_allclose(ours, (-tau * ce).numpy() + tau * np.log(300), atol=1e-5)


def test_a_generic_caption_ranks_below_a_specific_one_at_equal_clip_score():
    """Two pairs with the same CLIP score: the one whose caption also fits the other images (close
    to the centre of the images) gets the larger normaliser, so the lower negCLIPLoss."""
    rng = np.random.default_rng(2)
    img, txt = _unit(rng, 400), _unit(rng, 400)
    centre = img.mean(0) / np.linalg.norm(img.mean(0))
    for i, direction in ((0, centre), (1, _unit(rng, 1)[0])):  # caption 0 generic, caption 1 specific
        other = direction - (direction @ img[i]) * img[i]
        other /= np.linalg.norm(other)
        txt[i] = 0.5 * img[i] + np.sqrt(1 - 0.25) * other  # cosine 0.5 with its own image
    assert abs(img[0] @ txt[0] - img[1] @ txt[1]) < 1e-5
    keys = uid_keys([f"{i:04d}" for i in range(400)], 0)
    loss = neg_clip_loss(img, txt, keys, 0.05, 128, 5)
    assert np.isfinite(loss).all() and loss[0] < loss[1]
    assert np.array_equal(loss, neg_clip_loss(img, txt, keys, 0.05, 128, 5))
    # another seed draws other batches: other values, the same ranking of the two pairs
    other = neg_clip_loss(img, txt, uid_keys([f"{i:04d}" for i in range(400)], 1), 0.05, 128, 5)
    assert not np.array_equal(loss, other) and other[0] < other[1]


def test_norm_sim_is_max_and_l2_of_cosines():
    rng = np.random.default_rng(3)
    img, target = _unit(rng, 50), _unit(rng, 20)
    best, l2 = norm_sim(img, target)
    s = img @ target.T
    np.testing.assert_allclose(best, s.max(1), rtol=1e-6)
    np.testing.assert_allclose(l2, np.sqrt((s.astype(np.float64) ** 2).sum(1)), rtol=1e-6)


def test_stage_ranks_with_clip_rank_and_normsim_needs_the_same_model(pool: Path, tmp_path: Path):
    work = tmp_path / "w"
    pipe = make_pipeline(("clip_score", TINY), ("clip_loss", {"batch_size": 64, "batches": 2}),
                         ("clip_rank", {"scores_from": "clip_loss", "score_column": "negclip_loss", "top_fraction": 0.5}))
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work)).ok
    t = pl.read_parquet(work / "clip_loss" / "*.parquet")
    clip = pl.read_parquet(work / "clip_score" / "*.parquet", columns=["uid", "keep_clip_score"])
    d = t.join(clip, on="uid")
    scored = d.filter(pl.col("keep_clip_score"))
    assert scored["negclip_loss"].null_count() == 0 and scored.height > 300
    assert d.filter(~pl.col("keep_clip_score"))["negclip_loss"].null_count() == d.filter(~pl.col("keep_clip_score")).height
    assert t["normsim_inf"].null_count() == t.height  # no target
    rank = pl.read_parquet(work / "clip_rank" / "*.parquet").join(t, on="uid")
    kept = rank.filter(pl.col("keep_clip_rank"))
    assert kept.height == -(-scored.height // 2)
    assert kept["negclip_loss"].min() >= rank.filter(~pl.col("keep_clip_rank") & pl.col("negclip_loss").is_not_null())["negclip_loss"].max()

    # NormSim against a target made with the pool's model: the pool's own images score ~1 on themselves
    from curate.io.parquet import read_meta

    describe = read_meta(work / "clip_score" / "00000.parquet")["describe"]
    emb = np.array(pl.read_parquet(work / "clip_score" / "00000.parquet")["image_emb"].drop_nulls().to_list()[:20],
                   dtype=np.float32)
    save_reference(emb, describe, tmp_path / "target.npy")
    pipe2 = make_pipeline(("clip_score", TINY), ("clip_loss", {"batch_size": 64, "batches": 2,
                                                               "target": str(tmp_path / "target.npy")}))
    assert run_pipeline(pipe2, make_config(str(pool / "*.tar"), work)).ok
    t2 = pl.read_parquet(work / "clip_loss" / "00000.parquet")
    assert t2["normsim_inf"].drop_nulls().len() > 50 and t2["normsim_inf"].max() > 0.999
    assert (t2["normsim_2"].drop_nulls() >= t2["normsim_inf"].drop_nulls() - 1e-6).all()

    other = dict(describe, checkpoint_sha256="00" * 32)
    save_reference(emb, other, tmp_path / "other.npy")
    pipe3 = make_pipeline(("clip_score", TINY), ("clip_loss", {"target": str(tmp_path / "other.npy")}))
    res = run_pipeline(pipe3, make_config(str(pool / "*.tar"), work))
    assert not res.ok and "same model" in " ".join(res.problems())


def test_mistakes_are_named_before_any_work(pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="stores none"):
        run_pipeline(make_pipeline(("clip_score", TINY | {"store_embeddings": False}), ("clip_loss", {})),
                     make_config(str(pool / "*.tar"), tmp_path / "a"))
    with pytest.raises(ConfigError, match="target .* not found"):
        run_pipeline(make_pipeline(("clip_score", TINY), ("clip_loss", {"target": str(tmp_path / "none.npy")})),
                     make_config(str(pool / "*.tar"), tmp_path / "b"))
    with pytest.raises(ConfigError, match="not earlier"):
        run_pipeline(make_pipeline(("clip_loss", {})), make_config(str(pool / "*.tar"), tmp_path / "c"))


def test_batches_span_the_pool_so_values_do_not_depend_on_sharding_or_partitions(tmp_path: Path, tiny_ckpt: Path):
    """The same 300 pairs as 1 shard and as 4, combined in 1 task and in 3: byte-identical
    negCLIPLoss, equal to the in-memory computation over the whole pool in uid order."""
    from curate.io.embeddings import embeddings
    from curate.tools.synth import synthesize

    synthesize(tmp_path / "p1", samples=300, shards=1, seed=5)
    synthesize(tmp_path / "p4", samples=300, shards=4, seed=5)
    scorer = ("clip_score", {"model": "curate-tiny", "pretrained": str(tiny_ckpt), "batch_size": 32})
    out = {}
    for name, pool, parts in (("a", "p1", None), ("b", "p4", None), ("c", "p4", 3)):
        pipe = make_pipeline(scorer, ("clip_loss", {"batch_size": 64, "batches": 3, "partitions": parts}))
        s = run_pipeline(pipe, make_config(str(tmp_path / pool / "*.tar"), tmp_path / name))
        assert s.ok, s.problems()
        out[name] = pl.read_parquet(tmp_path / name / "clip_loss" / "*.parquet", columns=["uid", "negclip_loss"]).sort("uid")
    assert out["a"]["negclip_loss"].drop_nulls().len() > 250
    assert out["a"].equals(out["b"]) and out["a"].equals(out["c"])

    t = pl.read_parquet(tmp_path / "a" / "clip_score" / "*.parquet").filter(pl.col("image_emb").is_not_null()).sort("uid")
    arrow = t.to_arrow()
    img, txt = (embeddings(arrow, c) for c in ("image_emb", "text_emb"))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    want = neg_clip_loss(img, txt, uid_keys(t["uid"].to_list(), 0), 0.01, 64, 3).astype(np.float32)
    got = out["a"].join(t.select("uid"), on="uid")["negclip_loss"].to_numpy()
    np.testing.assert_array_equal(got, want)
