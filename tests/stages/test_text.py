from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from curate.runner.registry import load_pipeline
from curate.runner.pipeline import run_pipeline
from curate.contract.row_filter import Measured
from curate.stages.text import TextStage, junk_kind, normalise
from tests.conftest import ROOT, make_config, shared_data

COMMON_20 = ["en", "de", "fr", "es", "pt", "it", "nl", "ru", "zh", "ja", "ko", "ar", "pl", "tr", "sv",
             "vi", "id", "cs", "el", "uk"]


def _stage(**params) -> TextStage:
    return TextStage(TextStage.Params(**params))


def test_language_agrees_with_lingua_labels_on_20_common_languages():
    df = pl.read_csv(shared_data("langid/lingua_sample_600.tsv"), separator="\t", quote_char=None)
    sents = df.filter((pl.col("kind") == "sentences") & pl.col("lang").is_in(COMMON_20))
    assert sents["lang"].n_unique() == 20
    vals = _stage().measure_captions(sents["text"].to_list())
    got = pl.DataFrame({"lang": sents["lang"], "pred": vals["lang"]})
    per_lang = got.group_by("lang").agg((pl.col("lang") == pl.col("pred")).mean().alias("acc")).sort("acc")
    print(per_lang)
    overall = (got["lang"] == got["pred"]).mean()
    assert overall >= 0.95, overall
    assert per_lang["acc"].min() >= 0.6


def test_real_laion_captions_are_mostly_english():
    df = pl.read_parquet(shared_data("captions/laion400m_sample_10000.parquet")).head(3000)
    vals = _stage().measure_captions(df["TEXT"].to_list())
    langs = Counter(vals["lang"])
    print("top languages:", langs.most_common(8))
    assert langs["en"] / len(df) > 0.8
    assert len(langs) > 5  # the non-English rows are recognised as such
    ascii_only = [t.isascii() for t in df["TEXT"].to_list()]
    non_ascii_en = sum(1 for a, lang in zip(ascii_only, vals["lang"]) if not a and lang == "en")
    assert non_ascii_en < sum(1 for a in ascii_only if not a)


@pytest.mark.parametrize("caption,kind", [
    ("IMG_1234.jpg", "filename"), ("DSC_0001", "filename"), ("photo-23.png", "filename"),
    ("http://www.example.com/a/b.jpg", "url"), ("www.shop.com/item", "url"),
    ("untitled", "generic"), ("Image", "generic"), ("photo", "generic"), ("Untitled-3", "generic"),
    ("click here to enlarge", "placeholder"), ("Lorem ipsum dolor sit amet", "placeholder"),
    ("12345", "no_letters"), ("!!! ...", "no_letters"), ("😀😀😀", "no_letters"), ("", "empty"),
    ("a red car parked by the beach", None), ("Photo of my dog at the park", None),
])
def test_junk_patterns(caption: str, kind: str | None):
    assert junk_kind(normalise(caption)) == kind


@pytest.mark.slow
def test_caption_is_never_altered_but_scored_normalised(tmp_path: Path, pool: Path):
    run_pipeline(load_pipeline(ROOT / "pipelines" / "full.yaml"), make_config(str(pool / "00000.tar"), tmp_path),
                 only=["index", "text"])
    idx = pl.read_parquet(tmp_path / "index" / "00000.parquet")
    src = pl.read_parquet(pool / "ground_truth.parquet").filter(pl.col("shard") == "00000")
    assert idx.join(src, on="uid").filter(pl.col("caption") != pl.col("caption_right")).height == 0
    assert normalise("Caf&eacute; &amp; ﬁsh") == "Café & fish"


def test_broken_captions_get_reasons_not_crashes():
    st = _stage(max_chars=2000, min_alpha_ratio=0.5, max_repeat_run=50)
    caps = ["", "word " * 10_000, "caf\ufffd au lait is here", "😀😀😀😀", None, "a b", "\x00\x01 nul bytes here"]
    vals = st.measure_captions(caps)
    reasons = st.reasons(Measured(vals))
    print(reasons)
    assert reasons[0] is not None and reasons[1] == "caption:too_many_chars"  # (its repeat run: 10,000)
    assert reasons[3] is not None and reasons[4] is not None and reasons[5] is not None
    assert vals["n_words"][1] == 10_000 and vals["max_repeat_run"][1] == 10_000


def test_only_the_measures_a_threshold_reads_are_computed():
    caps = ["a photo of a dog dog dog on the beach"]
    assert _stage(drop_junk=False).optional_measures() == frozenset({"lang2"})  # the robust rule reads the runner-up
    top1 = _stage(drop_junk=False, language_decision="top1")
    assert top1.optional_measures() == frozenset()
    assert top1.measure_captions(caps)["lang2"] == [None] and top1.measure_captions(caps)["lang"] == ["en"]
    asked = _stage(drop_junk=False, language_decision="top1", measures=["lang2"]).measure_captions(caps)
    assert asked["lang2"][0] not in (None, "en") and 0 < asked["lang2_prob"][0] < asked["lang_prob"][0]
    vals = _stage(drop_junk=False, min_concepts=1).measure_captions(caps)
    assert vals["n_concepts"] == [2] and vals["alpha_ratio"] == [None] and vals["max_repeat_run"] == [None]
    every = _stage(measures="all").measure_captions(caps)
    assert every["max_repeat_run"] == [3] and every["unique_word_ratio"] == [0.7] and every["junk"] == [None]
    assert _stage(drop_junk=False, measures=["alpha_ratio"]).measure_captions(caps)["alpha_ratio"] == [1.0]


def test_synthetic_defects_confusion(pool: Path, tmp_path: Path):
    run_pipeline(load_pipeline(ROOT / "pipelines" / "full.yaml"), make_config(str(pool / "*.tar"), tmp_path),
                 only=["index", "text"])
    d = pl.read_parquet(tmp_path / "text" / "*.parquet").join(
        pl.read_parquet(pool / "ground_truth.parquet"), on="uid")
    table = d.group_by("label").agg(pl.len().alias("n"), (~pl.col("keep_text")).mean().alias("dropped"))
    print(table.sort("label"))
    text_defects = ["non_english", "junk_caption"]
    dropped = d.filter(~pl.col("keep_text"))
    recall = d.filter(pl.col("label").is_in(text_defects))["keep_text"].not_().mean()
    precision = dropped["label"].is_in(text_defects).mean()
    print(f"text defects: recall {recall:.3f} precision {precision:.3f}")
    assert recall >= 0.95 and precision >= 0.95
    nonen = d.filter(pl.col("label") == "non_english")
    assert (nonen["lang"] == nonen["language"]).mean() >= 0.8  # the right language, not just "not en"


CAPTION_LANGUAGES = [  # (caption, language the robust decision must give, rule)
    ("A BOY WITH A BLUE SHIRT AND JEAN PANTS DOING A TRICK WITH HIS SKATEBOARD", "en", "uppercase"),
    ("A woman on skis stands on a flat snowy surface.", "en", "function_words"),
    ("THERE ARE TWO PEOPLE RIDING HORESES ON THE BEACH SHORE", "en", None),
    ("UN CHIEN SUR LA PLAGE", "fr", "uppercase"),
    ("犬と猫", "ja", "script"),
    ("狗和猫", "zh", "script"),
    ("a photo of a dog on the beach", "en", "fasttext"),
    ("ein Hund spielt im Park mit einem Ball", "de", "fasttext"),
    ("Собака играет в парке", "ru", None),
    # brand names and short product captions stay English; short non-English ones do not
    ("Nike Air Max running shoes for men", "en", None),
    ("iPhone 12 Pro case", "en", None),
    ("vintage car", "en", "fasttext"),  # lingua leans Danish, not clearly enough to override
    ("gatto nero", "it", "second_detector"),  # fastText: es
    ("overtok likevel", "nb", "second_detector"),  # fastText: en with p 0.95, but two words
]


def test_the_robust_language_decision_keeps_english_captions_fasttext_misreads():
    st = TextStage(TextStage.Params(second_detector=True))
    vals = st.measure_captions([c for c, _, _ in CAPTION_LANGUAGES])
    for (cap, lang, rule), got, how in zip(CAPTION_LANGUAGES, vals["lang_final"], vals["lang_rule"]):
        assert got == lang, (cap, got, how)
        assert rule is None or how == rule, (cap, how)
    # the first two are the COCO captions fastText's top-1 calls ja and pl
    assert vals["lang"][:2] == ["ja", "pl"]
    reasons = st.reasons(Measured(vals))
    assert reasons[0] is None and reasons[1] is None and reasons[3] == "lang:fr"


def test_without_the_second_detector_short_non_english_passes_as_english():
    st = TextStage(TextStage.Params(second_detector=False))
    assert st.measure_captions(["overtok likevel"])["lang_final"] == ["en"]


def test_top1_keeps_datacomps_rule():
    st = TextStage(TextStage.Params(language_decision="top1"))
    vals = st.measure_captions([c for c, _, _ in CAPTION_LANGUAGES[:2]])
    assert vals["lang_final"] == ["ja", "pl"] and vals["lang_rule"] == ["fasttext", "fasttext"]
    assert st.reasons(Measured(vals)) == ["lang:ja", "lang:pl"]


def test_first_sense_concepts_need_a_wordnet_vocabulary(tmp_path: Path):
    from curate.core.config import ConfigError

    (tmp_path / "p.yaml").write_text("name: p\nstages:\n  - name: text\n    params:\n      min_concepts: 1\n"
                                     "      concept_rule: first_sense\n      concept_vocabulary: my_words.txt\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline(tmp_path / "p.yaml")
    assert "p.yaml" in str(e.value) and "concept_vocabulary must be imagenet21k or imagenet1k" in str(e.value)


def test_first_sense_concepts_count_tokens_as_datacomp_does():
    st = TextStage(TextStage.Params(concept_rule="first_sense", min_concepts=1, normalise=False))
    got = st.measure_captions(["Flowers in a garden", "dog, on the sofa", "GEESE", "", None])["n_concepts"]
    assert got == [2, 1, 1, 0, 0]  # flower, garden; sofa ("dog," keeps its comma); goose


def test_short_english_captions_that_fasttext_calls_a_near_language_stay_english():
    """Plain English alt-texts of a few words that fastText gives to Dutch, French or Italian with
    English among its candidates are English when every word is an English word; short text that
    is really Dutch, Spanish or Italian stays so, and top-1 (DataComp's rule) is unchanged."""
    english = ["Freeze Dried Raw Beef Hearts", "New Moon Movie Poster", "Mini Crop Top", "image of a door handle",
               "Lioness feeds leopard cub wild Africa wildlife"]
    other = {"de kat op de bank": "nl", "el perro en la playa": "es", "casa bianca al mare": "it",
             "ein Foto von einem Hund am Strand": "de"}
    m = _stage().measure_captions([*english, *other])
    assert m["lang_final"][:len(english)] == ["en"] * len(english)
    assert set(m["lang_rule"][:len(english)]) == {"english_words"}
    assert [la != "en" for la in m["lang"][:len(english)]] == [True] * len(english)  # fastText alone misses them
    assert m["lang_final"][len(english):] == list(other.values())
    top1 = _stage(language_decision="top1").measure_captions(english)
    assert "en" not in top1["lang_final"]
