"""Caption language decisions: fastText top-1 (DataComp) against the robust decision
(models/caption_language.py) on labelled text, and the text stage's throughput with each.

- English recall on real English captions (COCO val2017 captions; LAION captions that fastText
  calls English with p >= 0.9, a conservative stand-in for "both detectors agree").
- Short multilingual text (lingua's 600-line sample: words, word pairs, sentences in 25 languages):
  English precision and recall, and accuracy per language.
Data comes from ``CURATE_BENCH_DATA`` (default ``../shared/data``); absent data is reported, not faked.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import polars as pl

from curate.bench.common import ROOT, peak_rss_mb, save
from curate.stages.text import TextStage

DATA = Path(os.environ.get("CURATE_BENCH_DATA", ROOT.parent / "shared" / "data"))


DECISIONS = {"top1": {"language_decision": "top1"}, "robust": {},
             "robust_lingua": {"second_detector": True}}


def _decide(texts: list[str], decision: str) -> list[str | None]:
    st = TextStage(TextStage.Params(**DECISIONS[decision]))
    return st.measure_captions(texts)["lang_final"]


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
        for d in DECISIONS:
            got = _decide([r["text"] for r in rows], d)
            tp = sum(g == "en" and t == "en" for g, t in zip(got, truth))
            pred_en = sum(g == "en" for g in got)
            res[f"lingua_en_precision_{d}"] = round(tp / pred_en, 3) if pred_en else None
            res[f"lingua_en_recall_{d}"] = round(tp / max(1, truth.count("en")), 3)
            res[f"lingua_accuracy_by_language_{d}"] = {
                lang: round(sum(g == t for g, t in zip(got, truth) if t == lang) / truth.count(lang), 2)
                for lang in sorted(set(truth))}
    if laion.exists():
        caps = [c or "" for c in pl.read_parquet(laion)["TEXT"].to_list()]
        top1 = TextStage(TextStage.Params(language_decision="top1")).measure_captions(caps)
        sure_en = [c for c, lang, p in zip(caps, top1["lang"], top1["lang_prob"]) if lang == "en" and p >= 0.9]
        res["laion_sure_english"] = len(sure_en)
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
