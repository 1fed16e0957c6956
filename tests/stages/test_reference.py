from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate.io.parquet import write_table
from curate.runner.pipeline import run_pipeline
from curate.report.coverage import concept_coverage
from curate.stages.reference_filter import ReferenceError, save_reference
from curate.tools.synth import SHAPES
from tests.conftest import make_config, make_pipeline

DESCRIBE = {"model": "fake-embedder", "pretrained": None, "checkpoint_sha256": "ab" * 32}
REF_SHAPES = ("square", "triangle")


def _fake_clip_tables(pool: Path, work: Path, fp: str, dim: int = 16, noise_by_uid: bool = False) -> dict[str, str]:
    """clip_score tables whose image embeddings cluster by shape (what a trained CLIP would give),
    written with the pipeline's fingerprint and stats so the runner takes them as done. With
    ``noise_by_uid`` each embedding is drawn from its uid alone, so a pool written as 1 or 4 shards
    gets the same embeddings."""
    import hashlib

    truth = pl.read_parquet(pool / "ground_truth.parquet")
    shape_of = dict(zip(truth["uid"], truth["shape"]))
    centers = np.random.default_rng(0).normal(size=(len(SHAPES), dim)).astype(np.float32) * 3
    for shard in sorted(p.stem for p in pool.glob("*.tar")):
        uids = pl.read_parquet(work / "index" / f"{shard}.parquet")["uid"].to_list()
        rng = np.random.default_rng(int(shard))

        def noise(u: str, rng: np.random.Generator = rng) -> np.ndarray:
            if not noise_by_uid:
                return rng.normal(size=dim)
            return np.random.default_rng(int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(),
                                                        "little")).normal(size=dim)

        emb = np.stack([centers[SHAPES.index(shape_of[u])] + noise(u) for u in uids]).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        flat = pa.array(emb.astype(np.float16).reshape(-1), type=pa.float16())
        t = pa.table({"uid": uids, "clip_score": np.zeros(len(uids), np.float32),
                      "image_emb": pa.FixedSizeListArray.from_arrays(flat, dim),
                      "keep_clip_score": [True] * len(uids), "reason_clip_score": pa.nulls(len(uids), pa.string())})
        meta = {"stage": "clip_score", "shard": shard, "fingerprint": fp}
        write_table(t, work / "clip_score" / f"{shard}.parquet", meta=meta | {"describe": DESCRIBE})
        stats = pa.table({"run_id": ["fake"], "stage": ["clip_score"], "shard": [shard], "metric": ["n_in"],
                          "value": [float(len(uids))]})
        write_table(stats, work / "stats" / "clip_score" / f"{shard}.parquet", meta=meta)
    return shape_of


def _reference(tmp: Path, describe: dict, dim: int = 16) -> Path:
    centers = np.random.default_rng(0).normal(size=(len(SHAPES), dim)).astype(np.float32) * 3
    rng = np.random.default_rng(99)
    labels = [s for s in REF_SHAPES for _ in range(30)]
    ref = np.stack([centers[SHAPES.index(s)] + rng.normal(size=dim) for s in labels])
    path = tmp / "ref.npy"
    save_reference(ref, describe, path, labels=labels)
    return path


def _run(pool: Path, work: Path, ref: Path):
    """Index for real, clip_score faked (done), and the pipeline to run reference_filter on top."""
    from curate.runner.pipeline import stage_fingerprints
    from curate.runner.registry import build_stages

    pipe = make_pipeline(("clip_score", {"model": "curate-tiny", "pretrained": None}),
                         ("reference_filter", {"reference": str(ref), "n_centroids": 16}))
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work), only=["index"]).ok
    shards = sorted(p.stem for p in pool.glob("*.tar"))
    fp = stage_fingerprints(build_stages(pipe), shards)[1]
    return pipe, _fake_clip_tables(pool, work, fp)


def test_kept_pool_enriched_for_reference_concepts(pool: Path, tmp_path: Path):
    ref = _reference(tmp_path, DESCRIBE)
    work = tmp_path / "w"
    pipe, shape_of = _run(pool, work, ref)
    s = run_pipeline(pipe, make_config(str(pool / "*.tar"), work), only=["reference_filter"])
    assert s.ok, s.problems()
    d = pl.read_parquet(work / "reference_filter" / "*.parquet")
    d = d.with_columns(pl.col("uid").replace_strict(shape_of).alias("shape"))
    kept = d.filter(pl.col("keep_reference_filter"))
    share_in = d["shape"].is_in(REF_SHAPES).mean()
    share_kept = kept["shape"].is_in(REF_SHAPES).mean()
    print(f"reference shapes: {share_in:.2f} of the pool, {share_kept:.2f} of the kept samples")
    assert share_kept >= 0.9 and share_kept >= share_in + 0.4
    assert kept.height >= 0.8 * d["shape"].is_in(REF_SHAPES).sum()
    assert (work / "global" / "reference_filter_centroids.npy").exists()
    cov = concept_coverage(work)
    assert cov["label"].to_list() == sorted(REF_SHAPES)
    assert cov["reference_samples"].to_list() == [30, 30]
    for row in cov.iter_rows(named=True):  # each concept's clusters hold mostly that concept, all kept
        in_clusters = d.filter(pl.col("centroid").is_in(
            json.loads((work / "global" / "reference_filter.json").read_text())["label_centroids"][row["label"]]))
        assert row["pool_in_clusters"] == in_clusters.height
        assert (in_clusters["shape"] == row["label"]).mean() >= 0.9
        assert row["kept"] == row["pool_in_clusters"] and row["kept_pct_of_clusters"] == 100.0
    assert 99.0 <= cov["pct_of_all_kept"].sum() <= 101.0


@pytest.mark.slow
def test_same_decisions_with_1_or_2_workers(pool: Path, tmp_path: Path):
    ref = _reference(tmp_path, DESCRIBE)
    out = []
    for name, kind in (("a", "inprocess"), ("b", "local_cluster")):
        work = tmp_path / name
        pipe, _ = _run(pool, work, ref)
        assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work, kind=kind), only=["reference_filter"]).ok
        out.append(pl.read_parquet(work / "reference_filter" / "*.parquet").sort("uid"))
    assert out[0].equals(out[1])


def test_reference_from_another_model_is_refused(pool: Path, tmp_path: Path):
    other = dict(DESCRIBE, checkpoint_sha256="cd" * 32)
    ref = _reference(tmp_path, other)
    work = tmp_path / "w"
    pipe, _ = _run(pool, work, ref)
    s = run_pipeline(pipe, make_config(str(pool / "*.tar"), work), only=["reference_filter"])
    assert not s.ok
    assert any("made with" in p and "same model" in p for p in s.problems())
    (tmp_path / "ref.json").unlink()
    s = run_pipeline(pipe, make_config(str(pool / "*.tar"), work), only=["reference_filter"])
    assert any("sidecar" in p for p in s.problems())


def test_assignment_matches_faiss_and_ignores_chunking():
    import faiss

    from curate.stages.reference_filter import nearest_centroids

    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cent = rng.normal(size=(40, 64)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    x16 = x.astype(np.float16)
    mask = np.zeros(len(x), dtype=bool)
    mask[[0, 17, 4999]] = True  # null embeddings
    col = pa.FixedSizeListArray.from_arrays(pa.array(x16.reshape(-1), pa.float16()), 64, mask=pa.array(mask))
    ids, sims = nearest_centroids(cent, col)
    index = faiss.IndexFlatIP(64)
    index.add(cent)
    d, want = index.search(x16.astype(np.float32), 1)
    assert (ids[mask] == -1).all() and np.isnan(sims[mask]).all()
    assert (ids[~mask] == want[~mask, 0]).mean() > 0.999
    norms = np.linalg.norm(x16.astype(np.float32), axis=1)
    np.testing.assert_allclose(sims[~mask], d[~mask, 0] / norms[~mask], atol=1e-5)
    # any chunking, and a column that is a slice of a larger one, give the same bits
    for budget in (40, 40 * 7, 1 << 24):
        ids2, sims2 = nearest_centroids(cent, col, budget=budget)
        assert ids2.tolist() == ids.tolist() and sims2.tobytes() == sims.tobytes()
    tail_ids, tail_sims = nearest_centroids(cent, col.slice(1000))
    assert tail_ids.tolist() == ids[1000:].tolist() and tail_sims.tobytes() == sims[1000:].tobytes()


def test_reference_labels_from_class_folders_and_sidecar(tmp_path: Path):
    from curate.stages.reference_filter import load_reference
    from tests.conftest import jpeg_bytes

    tiny = {"model": "curate-tiny", "pretrained": None}
    for cls, colour in (("square", (200, 0, 0)), ("circle", (0, 0, 200))):
        (tmp_path / "ref" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "ref" / cls / f"{i}.jpg").write_bytes(jpeg_bytes((80, 80), colour))
    emb, labels, skipped = load_reference(str(tmp_path / "ref"), tiny)
    assert labels == ["circle", "circle", "square", "square"] and emb.shape[0] == 4 and skipped == 0
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg_bytes())
    assert load_reference(str(tmp_path / "flat"), tiny)[1] is None  # no class folders: no labels
    save_reference(emb, tiny, tmp_path / "r.npy", labels=["a", "b", "c", "d"])
    assert load_reference(str(tmp_path / "r.npy"), tiny)[1] == ["a", "b", "c", "d"]
    side = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(side | {"labels": ["a"]}))
    with pytest.raises(ReferenceError, match="1 labels for 4 embeddings"):
        load_reference(str(tmp_path / "r.npy"), tiny)


def test_report_shows_share_kept_per_reference_concept(pool: Path, tmp_path: Path):
    from curate.report.html import write_report

    ref = _reference(tmp_path, DESCRIBE)
    work = tmp_path / "w"
    pipe, _ = _run(pool, work, ref)
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work), only=["reference_filter"]).ok
    page = write_report(work).read_text()
    assert "Reference concepts" in page
    cov = concept_coverage(work)
    for r in cov.iter_rows(named=True):
        assert f"<td style='text-align:left'>{r['label']}</td><td>30</td>" in page


def test_plain_kmeans_keeps_mean_centroids_and_spherical_unit_ones():
    from curate.algorithms.vectors import train_centroids

    rng = np.random.default_rng(0)
    # two clusters of unit vectors around opposite directions (fewer than faiss samples down to):
    # a cluster mean is shorter than 1
    x = np.concatenate([rng.normal(size=(200, 16)) * 0.5 + 3, rng.normal(size=(200, 16)) * 0.5 - 3]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    plain = train_centroids(x, 2, seed=0, spherical=False)
    unit = train_centroids(x, 2, seed=0)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert (np.linalg.norm(plain, axis=1) < 0.99).all()
    np.testing.assert_allclose(np.sort(plain[:, 0]), np.sort([x[:200, 0].mean(), x[200:, 0].mean()]), atol=1e-5)


def test_a_broken_image_in_a_reference_set_is_skipped_and_counted(pool: Path, tmp_path: Path):
    """A truncated JPEG among the reference shards: left out with its label, counted in the stage's
    summary, and the stage and those after it still run."""
    from curate.stages.reference_filter import load_reference
    from tests.conftest import jpeg_bytes, write_tar

    good = jpeg_bytes((80, 80), (200, 0, 0))
    members = [("a.jpg", good), ("a.json", b'{"label": "red"}'), ("b.jpg", good[: len(good) // 2]),
               ("b.json", b'{"label": "broken"}'), ("c.jpg", jpeg_bytes((80, 80), (0, 0, 200))),
               ("c.json", b'{"label": "blue"}')]
    write_tar(tmp_path / "ref.tar", members)
    tiny = {"model": "curate-tiny", "pretrained": None}
    ref = load_reference(str(tmp_path / "ref.tar"), tiny)
    assert ref.labels == ["red", "blue"] and ref.emb.shape[0] == 2 and ref.skipped == 1
    pipe = make_pipeline(("clip_score", {"model": "curate-tiny", "pretrained": None}),
                         ("reference_filter", {"reference": str(tmp_path / "ref.tar"), "n_centroids": 4}),
                         ("text", {}))
    summary = run_pipeline(pipe, make_config(str(pool / "0000[01].tar"), tmp_path / "w"))
    assert summary.ok, summary.problems()
    art = json.loads((tmp_path / "w" / "global" / "reference_filter.json").read_text())
    assert art["reference_size"] == 2 and art["reference_skipped"] == 1


@pytest.mark.parametrize("stage", [
    ("reference_filter", {"n_centroids": 16, "kmeans_sample": 100}),
    ("dedup", {"exact": [], "phash_radius": None, "semantic_eps": 0.08, "kmeans_sample": 100, "n_clusters": 8,
               "keep": "smallest_uid"}),
])
def test_one_pool_as_1_or_4_shards_gives_the_same_decisions(tmp_path: Path, stage):
    """The k-means sample is drawn by uid: a pool larger than it, resharded, decides alike."""
    from curate.report.decisions import decisions
    from curate.runner.pipeline import stage_fingerprints
    from curate.runner.registry import build_stages
    from curate.tools.synth import synthesize

    name, params = stage
    if name == "reference_filter":
        params = params | {"reference": str(_reference(tmp_path, DESCRIBE))}
    pipe = make_pipeline(("clip_score", {"model": "curate-tiny", "pretrained": None}), (name, params))
    got = {}
    for shards in (1, 4):
        pool, work = tmp_path / f"pool{shards}", tmp_path / f"w{shards}"
        synthesize(pool, samples=400, shards=shards, seed=21)
        assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work), only=["index"]).ok
        names = sorted(p.stem for p in pool.glob("*.tar"))
        _fake_clip_tables(pool, work, stage_fingerprints(build_stages(pipe), names)[1], noise_by_uid=True)
        assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work)).ok
        got[shards] = decisions(work).select("uid", "kept", "reason").sort("uid")
    assert got[1]["uid"].to_list() == got[4]["uid"].to_list()
    assert got[1].equals(got[4]), got[1].join(got[4], on="uid").filter(pl.col("kept") != pl.col("kept_right"))
    assert 0 < got[1]["kept"].sum() < got[1].height  # the stage decided something
