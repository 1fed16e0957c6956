from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from curate.algorithms.concepts import get_matcher, spacing
from curate.io.shards import make_uid
from curate.runner.pipeline import run_pipeline
from curate.report.stats import global_summaries
from tests.conftest import jpeg_bytes, make_config, make_pipeline, shared_data, write_tar

IMG = jpeg_bytes()


def _pool(dirpath: Path, captions: list[str], shards: int) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(captions) / shards)
    for k in range(shards):
        members = []
        for i, cap in enumerate(captions[k * per:(k + 1) * per], start=k * per):
            key = f"{i:06d}"
            members += [(f"{key}.jpg", IMG), (f"{key}.txt", cap.encode()),
                        (f"{key}.json", json.dumps({"uid": make_uid("bal", key)}).encode())]
        write_tar(dirpath / f"{k:05d}.tar", members)
    return dirpath


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    p.write_text("cat\ndog\nred fox\nFox\n")
    return p


def test_matching_whole_phrases_and_case(vocab_file: Path):
    m = get_matcher(str(vocab_file), True)
    ents = m.vocab.entries
    def names(text):
        return [ents[i] for i in m.match(text)]
    assert names("a cat, a dog.") == ["cat", "dog"]
    assert names("concatenate dogma") == []  # whole words only
    assert names("the red fox and a Fox") == ["red fox", "Fox"]
    assert names("A RED FOX") == []  # case-sensitive like MetaCLIP
    assert [ents[i] for i in get_matcher(str(vocab_file), False).match("A RED FOX")] == ["red fox", "Fox"]
    assert spacing("a,b.") == " a , b .  "


def test_vocabulary_file_comments(tmp_path: Path):
    p = tmp_path / "v.txt"
    p.write_text("# shapes of the pool\ncircle\n  # indented comment\nC#\ncircle\n\n")
    assert get_matcher(str(p), True).vocab.entries == ("circle", "C#")


def test_counts_and_probabilities_by_hand(vocab_file: Path, tmp_path: Path):
    caps = ["a cat here"] * 8 + ["a dog there"] * 2 + ["a cat and a dog"] * 2 + ["nothing at all"] * 3
    pool = _pool(tmp_path / "pool", caps, shards=2)
    pipe = make_pipeline(("balance", {"vocabulary": str(vocab_file), "t": 4, "unmatched": "keep"}))
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "w")).ok
    cc = pl.read_parquet(tmp_path / "w" / "global" / "concept_counts.parquet")
    counts = dict(zip(cc["entry"], cc["count_before"]))
    assert counts == {"cat": 10, "dog": 4}
    d = pl.read_parquet(tmp_path / "w" / "balance" / "*.parquet").join(
        pl.read_parquet(tmp_path / "w" / "index" / "*.parquet", columns=["uid", "caption"]), on="uid")
    p = {c: v for c, v in zip(d["caption"], d["p_keep"])}
    assert p["a cat here"] == pytest.approx(0.4)  # min(1, 4/10)
    assert p["a dog there"] == pytest.approx(1.0)  # min(1, 4/4)
    assert p["a cat and a dog"] == pytest.approx(1 - (1 - 0.4) * (1 - 1.0))
    assert p["nothing at all"] == pytest.approx(1.0)  # unmatched: keep
    assert d.filter(pl.col("caption") == "a dog there")["keep_balance"].all()


def test_realised_keep_rate_within_binomial_bound(vocab_file: Path, tmp_path: Path):
    caps = ["a cat"] * 3000 + ["a dog"] * 60 + ["plain words"] * 40
    pool = _pool(tmp_path / "pool", caps, shards=3)
    pipe = make_pipeline(("balance", {"vocabulary": str(vocab_file), "t": 150, "seed": 5}))
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "w")).ok
    cc = pl.read_parquet(tmp_path / "w" / "global" / "concept_counts.parquet")
    row = cc.filter(pl.col("entry") == "cat").row(0, named=True)
    p = 150 / 3000
    mean, sd = 3000 * p, math.sqrt(3000 * p * (1 - p))
    print(f"cat kept {row['count_after']} (expected {mean:.0f} +- {3 * sd:.0f})")
    assert abs(row["count_after"] - mean) <= 3.5 * sd
    assert cc.filter(pl.col("entry") == "dog")["count_after"][0] == 60  # the tail is kept whole
    d = pl.read_parquet(tmp_path / "w" / "balance" / "*.parquet")
    assert d.filter(pl.col("reason_balance") == "balance:no_concept").height == 40
    summary = global_summaries(tmp_path / "w")["balance"]
    assert summary["head_tail"]["top1pct_share_after"] < summary["head_tail"]["top1pct_share_before"]


def test_target_size_solves_t_and_sharding_does_not_matter(vocab_file: Path, tmp_path: Path):
    caps = [["a cat", "a dog", "a red fox", "a cat and a dog"][i % 4] if i % 10 else "a cat" for i in range(800)]
    a = _pool(tmp_path / "a", caps, shards=1)
    b = _pool(tmp_path / "b", caps, shards=5)
    pipe = make_pipeline(("balance", {"vocabulary": str(vocab_file), "target_size": 300}))
    assert run_pipeline(pipe, make_config(str(a / "*.tar"), tmp_path / "wa")).ok
    assert run_pipeline(pipe, make_config(str(b / "*.tar"), tmp_path / "wb", kind="local_cluster")).ok
    cols = ["uid", "p_keep", "keep_balance", "reason_balance"]
    da = pl.read_parquet(tmp_path / "wa" / "balance" / "*.parquet", columns=cols).sort("uid")
    db = pl.read_parquet(tmp_path / "wb" / "balance" / "*.parquet", columns=cols).sort("uid")
    assert da.equals(db)
    assert abs(da["p_keep"].sum() - 300) < 1.0
    assert abs(da["keep_balance"].sum() - 300) < 4 * math.sqrt(300)


def test_real_laion_captions_match_imagenet21k(tmp_path: Path):
    caps = pl.read_parquet(shared_data("captions/laion400m_sample_10000.parquet"))["TEXT"].to_list()[:3000]
    m = get_matcher("imagenet21k", True)
    rate = sum(1 for c in caps if m.match(c)) / len(caps)
    lower = get_matcher("imagenet21k", False)
    rate_ci = sum(1 for c in caps if lower.match(c)) / len(caps)
    print(f"LAION captions matching >= 1 ImageNet-21k entry: {rate:.3f} case-sensitive, {rate_ci:.3f} not")
    assert 0.2 < rate < rate_ci < 1.0
    assert len(m.vocab.entries) > 30_000


def test_balance_params_validated():
    from pydantic import ValidationError

    from curate.stages.balance import BalanceStage

    with pytest.raises(ValidationError):
        BalanceStage.Params(t=10, target_size=5)
    with pytest.raises(ValidationError):
        BalanceStage.Params()


def test_per_language_caps_keep_the_reference_tail_share(tmp_path: Path):
    """MetaCLIP 2: English cat 10, dog 2 at t=4 keeps a tail share of (4 + 2) / 12 = 0.5; German
    Katze 4, Hund 2 gets the cap with the same share: (t + t) / 6 = 0.5, t = 1.5."""
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\ndog\nKatze\nHund\n")
    en = ["a small cat sleeps on the sofa in the living room"] * 10 + ["a big dog runs across the green park"] * 2
    de = ["eine kleine Katze schläft auf dem Sofa im Wohnzimmer"] * 4 + ["ein großer Hund rennt durch den grünen Park"] * 2
    pool = _pool(tmp_path / "pool", en + de, shards=3)
    text = ("text", {"languages": None})
    pipe = make_pipeline(text, ("balance", {"vocabulary": str(vocab), "t": 4, "per_language": True}))
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "w")).ok
    d = pl.read_parquet(tmp_path / "w" / "balance" / "*.parquet").join(
        pl.read_parquet(tmp_path / "w" / "index" / "*.parquet", columns=["uid", "caption"]), on="uid")
    p = dict(zip(d["caption"], d["p_keep"]))
    assert p[en[0]] == pytest.approx(0.4) and p[en[-1]] == pytest.approx(1.0)
    assert p[de[0]] == pytest.approx(1.5 / 4, rel=1e-6) and p[de[-1]] == pytest.approx(0.75, rel=1e-6)
    cc = pl.read_parquet(tmp_path / "w" / "global" / "concept_counts.parquet")
    assert sorted(zip(cc["language"], cc["entry"], cc["count_before"])) == [
        ("de", "Hund", 2), ("de", "Katze", 4), ("en", "cat", 10), ("en", "dog", 2)]
    summary = global_summaries(tmp_path / "w")["balance"]
    assert summary["t_by_language"]["de"] == pytest.approx(1.5, rel=1e-6) and summary["t_by_language"]["en"] == 4

    # without per_language every language shares t: German's counts are under the cap
    assert run_pipeline(make_pipeline(text, ("balance", {"vocabulary": str(vocab), "t": 4})),
                        make_config(str(pool / "*.tar"), tmp_path / "w2")).ok
    d2 = pl.read_parquet(tmp_path / "w2" / "balance" / "*.parquet").join(
        pl.read_parquet(tmp_path / "w2" / "index" / "*.parquet", columns=["uid", "caption"]), on="uid")
    assert dict(zip(d2["caption"], d2["p_keep"]))[de[0]] == pytest.approx(1.0)
    with pytest.raises(Exception, match="not earlier"):
        run_pipeline(make_pipeline(("balance", {"vocabulary": str(vocab), "t": 4, "per_language": True})),
                     make_config(str(pool / "*.tar"), tmp_path / "w3"))
