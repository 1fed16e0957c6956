"""Every recipe in pipelines/, offline: the same pool as 1, 4 and 7 shards, in-process and on a
two-worker Dask cluster, gives byte-identical stage tables (decisions, reasons, scores) for every
stage. Model stages use a seeded tiny CLIP; k-means samples and cluster splits are made smaller
than the pool so the sampled paths run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.runner.registry import load_pipeline
from curate.runner.pipeline import run_pipeline
from curate.models.clip import embed_dim
from curate.stages.reference_filter import save_reference
from curate.tools.synth import synthesize
from tests.conftest import ROOT, make_config

RECIPES = sorted(p.stem for p in (ROOT / "pipelines").glob("*.yaml"))
LAYOUT_COLUMNS = {"index.key", "index.shard"}  # where a sample lies, not what is decided about it
LAYOUTS = (("1", 1, "inprocess"), ("4", 4, "inprocess"), ("7", 7, "address"))
SAMPLES = 450


def _metadata_pool(out: Path, shards: int) -> Path:
    """A DataComp-style metadata pool (Parquet + .npz embeddings) with near-duplicate embeddings and
    tied scores, split into ``shards`` files: the same rows whatever the split."""
    rng = np.random.default_rng(11)
    words = "a the photo of dog cat red blue car tree house on in with at beach park street".split()
    n = SAMPLES
    caps = [" ".join(rng.choice(words, size=int(rng.integers(1, 9)))) for _ in range(n)]
    img = rng.normal(size=(n, 768)).astype(np.float32)
    img[1::7] = img[0::7][: len(img[1::7])] + 0.01 * rng.normal(size=(len(img[1::7]), 768))  # near copies
    txt = img + rng.normal(size=(n, 768)).astype(np.float32)
    unit = [(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16) for x in (img, txt)]
    score = np.round(rng.uniform(0.1, 0.4, size=n), 3)  # rounded: ties at the cut
    df = pl.DataFrame({"uid": [f"{i * 7919 % 10007:032x}" for i in range(n)], "url": [f"http://x/{i}.jpg" for i in range(n)],
                       "text": caps, "original_width": rng.integers(100, 900, n), "original_height": rng.integers(100, 900, n),
                       "clip_l14_similarity_score": score, "clip_b32_similarity_score": score[::-1].copy()})
    out.mkdir(parents=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        a, b = bounds[k], bounds[k + 1]
        df.slice(a, b - a).write_parquet(out / f"{k:05d}.parquet")
        np.savez(out / f"{k:05d}.npz", l14_img=unit[0][a:b], l14_txt=unit[1][a:b])
    return out


def _head(path: Path) -> Path:
    torch.manual_seed(0)
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(torch.nn.Linear(embed_dim("curate-tiny"), 16), torch.nn.Linear(16, 1))
    torch.save(head.state_dict(), path)
    return path


def _offline(recipe: str, files: dict[str, str]) -> object:
    """The recipe with its models, reference sets and checkpoints made local, and its samples and
    cluster sizes below the pool's size."""
    pipe = load_pipeline(ROOT / "pipelines" / f"{recipe}.yaml")
    metadata = any(s.name == "metadata_embeddings" or s.params.get("scores_from") == "index" for s in pipe.stages)
    stages = []
    for s in pipe.stages:
        p = dict(s.params)
        if s.name == "clip_score":
            p |= {"model": "curate-tiny", "pretrained": files["ckpt"], "batch_size": 32}
        if s.name == "recaption":  # random weights: the captions are junk, their determinism is the point
            p |= {"backend": "open_clip", "model": "curate-tiny-coca", "pretrained": None, "batch_size": 32,
                  "max_new_tokens": 5}
        if s.name == "reference_filter":
            p |= {"reference": files["meta_ref" if metadata else "ref"], "kmeans_sample": 100, "n_centroids": 12}
        if s.name == "clip_loss":
            p |= {"batch_size": 64, "batches": 3, "target": files["meta_ref" if metadata else "ref"]}
        if s.name == "dedup":
            semantic = {"semantic_eps": 0.001, "kmeans_sample": 100, "max_cluster_size": 30, "n_clusters": 3}
            p |= semantic if p.get("semantic_eps") else {}
        if s.name == "embedding_head":
            p |= {"checkpoint": files["head"], "min_score": -0.135}  # about the median of this seeded head
        if s.name == "clip_rank" and "calibrate" in p:
            p["calibrate"] = dict(p["calibrate"]) | {"heldout": files["heldout"]}
        if s.name in ("faces", "nsfw"):  # the detectors at a small input: their cost, not their decisions, shrinks
            p |= {"decode_side": 160}
        if s.name == "text_mask":
            p |= {"detect_side": 256}
        if s.name == "balance":
            p = {k: v for k, v in p.items() if k not in ("t", "target_size")} | {"t": 4}
        stages.append(s.model_copy(update={"params": p}))
    return pipe.model_copy(update={"stages": stages}), metadata


def _tables(work: Path, pipe) -> pl.DataFrame:
    """Every stage table of the run, embeddings left out, one row per uid."""
    frames = []
    for s in pipe.stages:
        sid = s.id or s.name
        t = pl.read_parquet(work / sid / "*.parquet")
        keep = [c for c, dt in t.schema.items() if not isinstance(dt, (pl.Array, pl.List)) or c == "phash_crops"]
        frames.append(t.select(keep).rename({c: f"{sid}.{c}" for c in keep if c != "uid"}).sort("uid"))
    return pl.concat(frames, how="align")


@pytest.fixture(scope="module")
def pools(tmp_path_factory, tiny_ckpt: Path) -> dict:
    root = tmp_path_factory.mktemp("recipes")
    files = {"ckpt": str(tiny_ckpt), "head": str(_head(root / "head.pth"))}
    synthesize(root / "ref", samples=40, shards=1, seed=99)
    synthesize(root / "heldout", samples=200, shards=1, seed=98, fractions={})
    files["heldout"] = str(root / "heldout" / "*.tar")
    files["ref"] = str(root / "ref" / "*.tar")
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(30, 768)).astype(np.float32)
    save_reference(ref / np.linalg.norm(ref, axis=1, keepdims=True), {"model": "ViT-L-14", "pretrained": "openai"},
                   root / "meta_ref.npy")
    files["meta_ref"] = str(root / "meta_ref.npy")
    out = {"files": files}
    for name, shards, _ in LAYOUTS:
        synthesize(root / f"tar{name}", samples=SAMPLES, shards=shards, seed=31)
        out[("tar", name)] = str(root / f"tar{name}" / "*.tar")
        out[("meta", name)] = str(_metadata_pool(root / f"meta{name}", shards) / "*.parquet")
    return out


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_decides_the_same_whatever_the_sharding_and_workers(recipe: str, pools: dict, cluster: str,
                                                                 tmp_path: Path):
    pipe, metadata = _offline(recipe, pools["files"])
    results = {}
    for name, _, kind in LAYOUTS:
        work = tmp_path / name
        extra = {"address": cluster} if kind == "address" else {}
        cfg = make_config(pools[("meta" if metadata else "tar", name)], work, kind=kind, **extra)
        summary = run_pipeline(pipe, cfg)
        assert summary.ok, summary.problems()
        results[name] = _tables(work, pipe)
    first = results["1"]
    assert first.height == SAMPLES
    keeps = [c for c in first.columns if c.split(".")[-1].startswith("keep_")]
    for name in ("4", "7"):
        for c in set(first.columns) - LAYOUT_COLUMNS:
            assert first[c].equals(results[name][c]), f"{recipe}: column {c} differs between 1 and {name} shards"
    if keeps:  # something is decided, and not everything dropped
        assert 0 < first[keeps[-1]].fill_null(False).sum()
