from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate.algorithms.class_vocabulary import CaptionConfirmer, VocabularyError, load_classes, plural_forms
from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from curate.report.html import write_report
from curate.contract.base import RunInfo
from curate.stages.classifier import ClassifierStage, top_k
from curate.stages.clip_score import ClipScoreStage
from curate.runner.memory import MemoryShardContext
from tests.conftest import make_config, make_pipeline

ROOT = Path(__file__).resolve().parents[2]
SHAPES = str(ROOT / "pipelines" / "vocab" / "synthetic_shapes.txt")
TINY = {"model": "curate-tiny", "pretrained": None}


def test_top_k_is_ordered_and_breaks_ties_by_class():
    p = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
    assert top_k(p, 3).tolist() == [[1, 3, 0], [0, 1, 2]]
    assert top_k(p, 10).tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]


def test_plurals_synonyms_and_wordnet_hypernyms_confirm_a_class():
    assert plural_forms("puppy") == ["puppy", "puppys", "puppies"] and "boxes" in plural_forms("box")
    vocab = load_classes("imagenet1k")
    golden = vocab.names.index("Golden Retriever")
    conf = CaptionConfirmer(vocab, levels=6, min_depth=6)
    assert conf.confirmed_by("Two DOGS playing in the park", [golden]) == "dogs"
    assert conf.confirmed_by("my golden retriever, asleep", [golden]) == "golden retriever"
    assert conf.confirmed_by("a retriever on the beach", [golden]) == "retriever"
    assert conf.confirmed_by("an object on a table", [golden]) is None  # too general to confirm
    assert conf.confirmed_by("a cat on a sofa", [golden]) is None
    assert CaptionConfirmer(vocab, levels=0, min_depth=6).confirmed_by("two dogs", [golden]) is None


def test_vocabulary_files_and_their_mistakes(tmp_path: Path):
    f = tmp_path / "v.txt"
    f.write_text("# mine\ncar, automobile\nn02084071\n\n")
    v = load_classes(str(f))
    assert v.names == ("car", "dog") and v.synonyms[0] == ("car", "automobile") and v.wnids[1] == "n02084071"
    conf = CaptionConfirmer(v, levels=2, min_depth=6)
    assert conf.confirmed_by("automobiles parked", [0]) == "automobiles"
    assert conf.confirmed_by("a canine friend", [1]) == "canine"  # wnid lines get WordNet hypernyms
    for text, err in (("", "holds no class"), ("# only a comment\n", "holds no class"),
                      ("n99999999\n", "not a WordNet 3.0 noun synset")):
        f.write_text(text)
        load_classes.cache_clear()
        with pytest.raises(VocabularyError, match=err):
            load_classes(str(f))
    with pytest.raises(VocabularyError, match="not a built-in"):
        load_classes(str(tmp_path / "missing.txt"))


def _run(pool: Path, work: Path, **params):
    pipe = make_pipeline(("clip_score", TINY), ("classifier", {"vocabulary": SHAPES, "top_k": 2} | params))
    return run_pipeline(pipe, make_config(str(pool / "*.tar"), work))


def test_stage_on_a_pool_with_the_tiny_clip(pool: Path, tmp_path: Path):
    """Mechanics with random weights: every survivor is judged, the decision agrees with the
    columns, the class embeddings are computed once into the run's cache, resume recomputes nothing."""
    work = tmp_path / "w"
    assert _run(pool, work, min_confidence=0.0).ok
    t = pl.read_parquet(work / "classifier" / "*.parquet")
    clip = pl.read_parquet(work / "clip_score" / "*.parquet", columns=["uid", "keep_clip_score"])
    judged = t.join(clip, on="uid").filter(pl.col("keep_clip_score"))
    assert judged.height > 300 and judged["cls_decision"].null_count() == 0
    assert set(judged["cls_decision"]) <= {"match", "mismatch"}  # min_confidence 0: never unsure
    assert judged.filter(pl.col("cls_decision") == "mismatch")["reason_classifier"].unique().to_list() == [
        "classifier:caption_mismatch"]
    matched = judged.filter(pl.col("cls_decision") == "match")
    assert matched.height > 0 and matched["cls_match"].null_count() == 0 and matched["keep_classifier"].all()
    assert all(len(x) == 2 and x[0] >= x[1] for x in judged["cls_probs"].to_list())
    page = write_report(work).read_text()  # classes per pair in the report and its gallery
    assert "Classifier classifier: predicted classes" in page and "<h3>classifier:caption_mismatch</h3>" in page
    top = judged["cls_labels"].list.first().value_counts().sort(["count", "cls_labels"], descending=[True, False])
    assert f"<td class='l'>{top['cls_labels'][0]}</td><td>{top['count'][0]}</td>" in page
    assert "classes: " in page
    caches = list((work / "cache" / "classifier").glob("classes-*.npz"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    before = t.sort("uid")

    # a confident-only rule keeps the unsure; the cache is reused (same model, vocabulary, prompts)
    assert _run(pool, work, min_confidence=0.99).ok
    t2 = pl.read_parquet(work / "classifier" / "*.parquet").join(clip, on="uid").filter(pl.col("keep_clip_score"))
    assert set(t2["cls_decision"]) == {"match", "unsure"} and t2["keep_classifier"].all()
    assert caches[0].stat().st_mtime_ns == stamp
    assert _run(pool, work, min_confidence=0.0).ok
    assert pl.read_parquet(work / "classifier" / "*.parquet").sort("uid").equals(before)


def _context(emb: pa.Array, captions: list[str], cls: ClassifierStage) -> MemoryShardContext:
    """A shard whose clip_score table (``emb``) is given, scored by the tiny random CLIP."""
    uids = [f"u{i}" for i in range(len(captions))]
    tables = {"index": pa.table({"uid": uids, "caption": captions}),
              "clip_score": pa.table({"uid": uids, "image_emb": emb})}
    return MemoryShardContext(shard_path="<memory>", shard="m", stage_id=cls.stage_id, upstream=[],
                              run=RunInfo(run_id="m", workdir="."), reads=cls.reads(), tables=tables,
                              stages={"clip_score": ClipScoreStage(ClipScoreStage.Params(**TINY))})


def _emb(rows: list, d: int) -> pa.Array:
    from curate.io.embeddings import fixed_list

    return fixed_list(rows, d)


def test_rows_without_a_usable_embedding_get_a_reason():
    from curate.models.clip import embed_dim

    d = embed_dim("curate-tiny")
    cls = ClassifierStage(ClassifierStage.Params(vocabulary=SHAPES, min_confidence=0.0))
    good = np.random.default_rng(0).normal(size=d).astype(np.float16)
    broken = np.full(d, np.nan, np.float16)
    out = cls.process(_context(_emb([good, None, broken, np.zeros(d, np.float16)], d),
                               ["a circle", "a star", "a ring", "a cross"], cls))
    assert out.columns["cls_decision"] == [out.columns["cls_decision"][0], "no_embedding", "no_embedding",
                                           "no_embedding"]
    assert out.columns["cls_decision"][0] in ("match", "mismatch")
    assert out.reasons[1:] == ["classifier:no_embedding"] * 3
    assert out.columns["cls_labels"][1] is None and len(out.columns["cls_labels"][0]) == 5


def test_embeddings_of_another_model_are_an_error():
    cls = ClassifierStage(ClassifierStage.Params(vocabulary=SHAPES))
    with pytest.raises(RuntimeError, match="4 dimensions"):
        cls.process(_context(_emb([np.ones(4), np.ones(4)], 4), ["a circle", "a star"], cls))


def test_mistakes_are_named_before_any_work(pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="stores none"):
        run_pipeline(make_pipeline(("clip_score", TINY | {"store_embeddings": False}), ("classifier", {})),
                     make_config(str(pool / "*.tar"), tmp_path / "a"))
    with pytest.raises(ConfigError, match="not earlier in the pipeline"):
        run_pipeline(make_pipeline(("classifier", {})), make_config(str(pool / "*.tar"), tmp_path / "b"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no class"):
        _run(pool, tmp_path / "c", vocabulary=str(empty))
    with pytest.raises(ConfigError, match="unknown open_clip model|nope"):
        run_pipeline(make_pipeline(("clip_score", {"model": "nope", "pretrained": None}), ("classifier", {})),
                     make_config(str(pool / "*.tar"), tmp_path / "d"))
    with pytest.raises(ConfigError, match="template"):
        _run(pool, tmp_path / "e", templates=["no slot"])
    assert not (tmp_path / "c" / "classifier").exists()
