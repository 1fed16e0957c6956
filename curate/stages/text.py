"""Text stage: language ID and caption quality, each a value column plus an optional threshold.

The caption is never altered in any output; an NFKC-normalised, HTML-unescaped form is only used
for scoring. Thresholds set to null are not applied (the column is still written), so a user can
re-threshold later without recomputing.
"""
from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

import pyarrow as pa
from pydantic import Field

from curate.concepts import get_matcher
from curate.config import Strict
from curate.models.langid import load_langid, predict_languages
from curate.stages.base import MapStage, ShardContext
from curate.stages.registry import register_stage

_IMG_EXT = r"(?:jpe?g|png|gif|webp|bmp|tiff?|heic|avif)"
# Junk caption patterns: name -> regex on the normalised, stripped caption. Order is priority.
JUNK_PATTERNS: dict[str, re.Pattern] = {
    "url": re.compile(r"^(?:https?://|www\.)\S+$", re.I),
    "filename": re.compile(
        rf"^(?:\S+\.{_IMG_EXT}|(?:img|dsc[nf]?|dcim|pxl|gopr|mvi|sam|pict?|screenshot)[\s_-]?\d[\w-]*"
        rf"(?:\.{_IMG_EXT})?)$", re.I),
    "generic": re.compile(r"^(?:untitled|image|images|photo|photos|picture|pic|img|photograph|thumbnail|"
                          r"default|no title|none|null|n/?a|unknown)(?:[\s_-]*\d+)?[.!]*$", re.I),
    "placeholder": re.compile(r"lorem ipsum|placeholder|no description|click (?:here )?to (?:enlarge|view|zoom)|"
                              r"image (?:not available|unavailable|coming soon)|no image available", re.I),
}


def normalise(text: str) -> str:
    """Scoring form: HTML entities decoded, NFKC, whitespace collapsed."""
    if "&" in text:
        text = html.unescape(text)
    return " ".join(unicodedata.normalize("NFKC", text).split())


def junk_kind(norm: str) -> str | None:
    if not norm:
        return "empty"
    if not any(ch.isalpha() for ch in norm):
        return "no_letters"  # only numbers, punctuation, symbols or emoji
    for name, pat in JUNK_PATTERNS.items():
        if pat.search(norm):
            return name
    return None


def max_repeat_run(words: list[str]) -> int:
    best = run = 0
    prev = None
    for w in words:
        run = run + 1 if w == prev else 1
        prev = w
        best = max(best, run)
    return best


@register_stage
class TextStage(MapStage):
    name = "text"
    version = "1"

    class Params(Strict):
        languages: list[str] | None = Field(["en"], description="allowed top-1 languages; null: any")
        min_lang_prob: float = Field(0.0, ge=0, le=1, description="DataComp uses 0 (top-1 only)")
        langid_model: str | None = Field(None, description="path to lid.176.bin/.ftz; default: bundled .ftz")
        min_words: int | None = Field(3, ge=0, description="DataComp: more than 2 words")
        min_chars: int | None = Field(6, ge=0, description="DataComp: more than 5 characters")
        max_chars: int | None = Field(None, ge=1)
        min_unique_word_ratio: float | None = Field(None, ge=0, le=1)
        min_alpha_ratio: float | None = Field(None, ge=0, le=1)
        max_repeat_run: int | None = Field(None, ge=1)
        min_concepts: int | None = Field(None, ge=0, description="text-based baseline: 1")
        concept_vocabulary: str = "imagenet21k"
        drop_junk: bool = True
        all_rows: bool = False

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("lang", pa.string()), pa.field("lang_prob", pa.float32()),
                pa.field("lang2", pa.string()), pa.field("lang2_prob", pa.float32()),
                pa.field("n_chars", pa.int32()), pa.field("n_words", pa.int32()),
                pa.field("unique_word_ratio", pa.float32()), pa.field("alpha_ratio", pa.float32()),
                pa.field("max_repeat_run", pa.int32()), pa.field("n_concepts", pa.int32()),
                pa.field("junk", pa.string())]

    def describe(self) -> dict[str, Any]:
        from curate.models.langid import default_model_path

        return {"langid_model": self.params.langid_model or default_model_path()}

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return {"vocabulary": self.params.concept_vocabulary}

    def measure(self, captions: list[str | None]) -> dict[str, list]:
        """Value columns for a list of captions (None allowed)."""
        p = self.params
        model = load_langid(p.langid_model)
        matcher = get_matcher(p.concept_vocabulary, False, 3)
        norms = [normalise(c) if c else "" for c in captions]
        preds = predict_languages(model, norms, k=2)
        cols: dict[str, list] = {f.name: [] for f in self.value_fields()}
        for c, norm, pr in zip(captions, norms, preds):
            words = norm.lower().split()
            nonspace = len(norm) - norm.count(" ")
            cols["lang"].append(pr[0][0] if pr else None)
            cols["lang_prob"].append(pr[0][1] if pr else None)
            cols["lang2"].append(pr[1][0] if len(pr) > 1 else None)
            cols["lang2_prob"].append(pr[1][1] if len(pr) > 1 else None)
            cols["n_chars"].append(len(norm))
            cols["n_words"].append(len(words))
            cols["unique_word_ratio"].append(len(set(words)) / len(words) if words else 0.0)
            cols["alpha_ratio"].append(sum(map(str.isalpha, norm)) / nonspace if nonspace else 0.0)
            cols["max_repeat_run"].append(max_repeat_run(words))
            cols["n_concepts"].append(len(matcher.match(norm)))
            cols["junk"].append(junk_kind(norm) if c is not None else "empty")
        return cols

    def reason(self, row: dict[str, Any]) -> str | None:
        """First failing rule for one row of values, in a fixed order."""
        p = self.params
        if p.languages is not None and row["lang"] not in p.languages:
            return f"lang:{row['lang']}"
        if row["lang_prob"] is not None and row["lang_prob"] < p.min_lang_prob:
            return "lang:low_prob"
        if p.drop_junk and row["junk"]:
            return f"caption:junk_{row['junk']}"
        checks = [
            (p.min_words is not None and row["n_words"] < p.min_words, "caption:too_few_words"),
            (p.min_chars is not None and row["n_chars"] < p.min_chars, "caption:too_few_chars"),
            (p.max_chars is not None and row["n_chars"] > p.max_chars, "caption:too_many_chars"),
            (p.min_unique_word_ratio is not None and row["unique_word_ratio"] < p.min_unique_word_ratio,
             "caption:low_unique_ratio"),
            (p.min_alpha_ratio is not None and row["alpha_ratio"] < p.min_alpha_ratio, "caption:low_alpha_ratio"),
            (p.max_repeat_run is not None and row["max_repeat_run"] > p.max_repeat_run, "caption:repeated_word"),
            (p.min_concepts is not None and row["n_concepts"] < p.min_concepts, "caption:no_concept"),
        ]
        return next((r for bad, r in checks if bad), None)

    def process(self, ctx: ShardContext) -> dict[str, Any]:
        captions = ctx.index(["caption"]).column("caption").to_pylist()
        evaluate = ctx.evaluate
        idx = [i for i, ev in enumerate(evaluate) if ev]
        vals = self.measure([captions[i] for i in idx])
        n = len(captions)
        cols: dict[str, list] = {k: [None] * n for k in vals}
        reasons: list[str | None] = [None] * n
        names = list(vals)
        for j, i in enumerate(idx):
            row = {k: vals[k][j] for k in names}
            for k in names:
                cols[k][i] = row[k]
            reasons[i] = self.reason(row)
        cols["__reasons__"] = reasons
        return cols
