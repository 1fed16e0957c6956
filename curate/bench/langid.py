"""Caption language decisions: fastText top-1 (DataComp) against the robust decision
(models/caption_language.py) on labelled text, and the text stage's throughput with each.

- English recall on real English captions (COCO val2017 captions; LAION captions that fastText
  calls English with p >= 0.9, a conservative stand-in for "both detectors agree").
- Short multilingual text (lingua's 600-line sample: words, word pairs, sentences in 75 languages):
  English precision and recall, and accuracy per language. A non-English line made only of English
  words ("group" labelled Dutch, "tension" Albanian) is English too; such lines are listed as
  ambiguous and precision is also given without them.
Data comes from ``CURATE_BENCH_DATA`` (default ``../shared/data``); absent data is reported, not faked.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import polars as pl

from curate.bench.common import ROOT, peak_rss_mb, save
from curate.models import caption_language
from curate.stages.text import TextStage

DATA = Path(os.environ.get("CURATE_BENCH_DATA", ROOT.parent / "shared" / "data"))


DECISIONS = {"top1": {"language_decision": "top1"}, "robust": {},
             "robust_lingua": {"second_detector": True}}


def _decide(texts: list[str], decision: str) -> list[str | None]:
    st = TextStage(TextStage.Params(**DECISIONS[decision]))
    return st.measure_captions(texts)["lang_final"]


def english_words_only(text: str) -> bool:
    """Every word of ``text`` is an English word (one word is enough): a line a reader could not
    call non-English without its label."""
    return caption_language.english_words_only(text, min_words=1)


def _precision(got: list, truth: list, keep: list[bool]) -> tuple[float | None, float]:
    pairs = [(g, t) for g, t, k in zip(got, truth, keep) if k]
    tp = sum(g == "en" and t == "en" for g, t in pairs)
    pred_en = sum(g == "en" for g, _ in pairs)
    return (round(tp / pred_en, 3) if pred_en else None,
            round(tp / max(1, sum(t == "en" for _, t in pairs)), 3))


def run() -> dict:
    res: dict = {}
    coco = DATA / "images" / "coco_val2017_mini_captions.tsv"
    lingua = DATA / "langid" / "lingua_sample_600.tsv"
    laion = DATA / "captions" / "laion400m_sample_10000.parquet"
    if coco.exists():
        caps = [r["caption"] for r in csv.DictReader(coco.open(), delimiter="\t") if r["caption"]]
        for d in DECISIONS:
            got = _decide(caps, d)
            res[f"coco_english_recall_{d}"] = round(sum(g == "en" for g in got) / len(caps), 4)
            res[f"coco_missed_{d}"] = [c for c, g in zip(caps, got) if g != "en"][:5]
    if lingua.exists():
        rows = list(csv.DictReader(lingua.open(), delimiter="\t"))
        truth = [r["lang"] for r in rows]
        clear = [t == "en" or not english_words_only(r["text"]) for r, t in zip(rows, truth)]
        res["lingua_ambiguous_lines"] = [f'{r["lang"]}: {r["text"]}' for r, c in zip(rows, clear) if not c]
        for d in DECISIONS:
            got = _decide([r["text"] for r in rows], d)
            prec, rec = _precision(got, truth, [True] * len(rows))
            res[f"lingua_en_precision_{d}"], res[f"lingua_en_recall_{d}"] = prec, rec
            res[f"lingua_en_precision_unambiguous_{d}"] = _precision(got, truth, clear)[0]
            res[f"lingua_false_english_{d}"] = [f'{r["lang"]}: {r["text"]}' for r, g, t in zip(rows, got, truth)
                                                 if g == "en" and t != "en"][:12]
            res[f"lingua_non_english_called_english_{d}"] = round(
                sum(g == "en" and t != "en" for g, t in zip(got, truth)) / max(1, sum(t != "en" for t in truth)), 4)
            res[f"lingua_accuracy_by_language_{d}"] = {
                lang: round(sum(g == t for g, t in zip(got, truth) if t == lang) / truth.count(lang), 2)
                for lang in sorted(set(truth))}
    if laion.exists():
        caps = [c or "" for c in pl.read_parquet(laion)["TEXT"].to_list()]
        top1 = TextStage(TextStage.Params(language_decision="top1")).measure_captions(caps)
        sure_en = [c for c, lang, p in zip(caps, top1["lang"], top1["lang_prob"]) if lang == "en" and p >= 0.9]
        res["laion_sure_english"] = len(sure_en)
        # plain short English alt-texts: 3-8 ASCII words, each an English word
        short = [c for c in caps if 3 <= len(c.split()) <= 8 and c.isascii() and english_words_only(c)]
        res["laion_short_english_alt_texts"] = len(short)
        for d in DECISIONS:
            got = _decide(short, d)
            res[f"laion_short_english_recall_{d}"] = round(sum(g == "en" for g in got) / len(short), 4)
            res[f"laion_short_english_missed_{d}"] = [c for c, g in zip(short, got) if g != "en"][:6]
        for d in ("robust", "robust_lingua"):
            res[f"laion_sure_english_recall_{d}"] = round(sum(g == "en" for g in _decide(sure_en, d)) / len(sure_en), 4)
        for name, params in DECISIONS.items():
            st = TextStage(TextStage.Params(**params))
            st.measure_captions(caps[:200])
            t0 = time.perf_counter()
            out = st.measure_captions(caps)
            res[f"text_stage_captions_per_s_{name}"] = round(len(caps) / (time.perf_counter() - t0))
            res[f"laion_changed_by_second_detector_{name}"] = round(out["lang_rule"].count("second_detector") / len(caps), 4)
        res["peak_rss_mb"] = round(peak_rss_mb())
        res["target_captions_per_s"] = ">= 20000 per core"
    if not res:
        res["skipped"] = f"no labelled data under {DATA}"
    save("langid", res)
    return res
