"""Text stage: language ID and caption quality, each a value column plus an optional threshold.

The caption is never altered in any output; an NFKC-normalised, HTML-unescaped form is only used
for scoring. Thresholds set to null are not applied (the column is still written), so a user can
re-threshold later without recomputing.
"""
from __future__ import annotations

import html
import operator
import re
import unicodedata
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from curate.algorithms.concepts import get_matcher
from curate.algorithms.whitespace import split_count
from curate.algorithms.wordnet import FirstSenseMatcher
from curate.core.config import Strict
from curate.models.caption_language import decide, second_detector
from curate.models.langid import load_langid, predict_languages, top1_languages
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule

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


# The patterns anchored at both ends (all but "placeholder") never match a normalised caption with
# three or more spaces: skipping them there saves most of the regex work on real captions.
_ANCHORED = ("url", "filename", "generic")
# "placeholder" scans the whole caption: a case-sensitive scan of the lowercased text lets the
# regex engine skip ahead on the first letters, which re.I prevents (several times faster).
_PLACEHOLDER_LOWER = re.compile(JUNK_PATTERNS["placeholder"].pattern)


def junk_kind(norm: str, lower: str | None = None) -> str | None:
    """The first junk pattern a normalised caption matches (``lower``: norm.lower(), if known)."""
    if not norm:
        return "empty"
    if not any(ch.isalpha() for ch in norm):
        return "no_letters"  # only numbers, punctuation, symbols or emoji
    if norm.count(" ") < 3:
        for name in _ANCHORED:
            if JUNK_PATTERNS[name].search(norm):
                return name
    return "placeholder" if _PLACEHOLDER_LOWER.search(norm.lower() if lower is None else lower) else None


_FASTTEXT_SPACE = re.compile("[ \n\r\t\v\f\0]+")


def fasttext_token_count(text: str) -> int:
    """``len(fasttext.tokenize(text))``: fastText splits on ASCII whitespace and NUL only (a
    non-breaking space stays inside a word) and reads every newline as one more token (``</s>``)."""
    return sum(1 for w in _FASTTEXT_SPACE.split(text) if w) + text.count("\n")


def max_repeat_run(words: list[str]) -> int:
    best = run = 0
    prev = None
    for w in words:
        run = run + 1 if w == prev else 1
        prev = w
        best = max(best, run)
    return best


# Measures computed only when a threshold (or ``measures``) asks for them; language, characters and
# words are always computed (cheap, and what the report plots).
OPTIONAL_MEASURES = ("unique_word_ratio", "alpha_ratio", "max_repeat_run", "n_concepts", "junk", "lang2")
OPTIONAL_COLUMNS = {m: m for m in OPTIONAL_MEASURES} | {"lang2_prob": "lang2"}  # column -> its measure
THRESHOLD_MEASURE = {"min_unique_word_ratio": "unique_word_ratio", "min_alpha_ratio": "alpha_ratio",
                     "max_repeat_run": "max_repeat_run", "min_concepts": "n_concepts", "drop_junk": "junk"}


@register_stage
class TextStage(RowFilter):
    """Caption filters: fastText language, length, word statistics, junk patterns, concept words."""

    name = "text"
    columns = {
        "lang": "fastText lid.176 top-1 language (ISO 639-1)",
        "lang_prob": "probability of the top-1 language",
        "lang2": "fastText runner-up language",
        "lang2_prob": "probability of the runner-up language",
        "lang_final": "the language the languages rule reads: fastText top-1, or corrected by lang_rule",
        "lang_rule": "what decided lang_final: fasttext, uppercase (re-predicted in lower case), script "
                     "(top-1 in another script than the caption's), function_words (unsure, mostly English "
                     "function words), second_detector (lingua, for a short or unsure caption)",
        "n_chars": "characters in the caption",
        "n_words": "whitespace-separated words in the caption (word_count says whose whitespace)",
        "unique_word_ratio": "distinct words / words",
        "alpha_ratio": "share of letters among non-space characters",
        "max_repeat_run": "longest run of one word repeated in a row",
        "n_concepts": "concept-vocabulary entries (ImageNet-21k lemmas by default) found in the caption; with "
                      "concept_rule first_sense, whitespace tokens whose first WordNet sense is a vocabulary synset",
        "junk": "the junk pattern the caption matches (file name, URL, untitled, placeholder, no letters), or null",
    }
    version = "2"

    class Params(Strict):
        languages: list[str] | None = Field(["en"], description="allowed languages (of lang_final); null: any")
        language_decision: Literal["robust", "top1"] = Field(
            "robust", description="robust: fastText corrected for capitals, script and unsure English, "
            "and lingua for short or unsure captions (models/caption_language.py); top1: fastText's "
            "top-1 alone (DataComp parity)")
        second_detector: bool = Field(False, description="robust decision: consult lingua where fastText is "
                                      "unsure or the caption is short (better on short non-English captions; "
                                      "much slower, and more memory per worker: see the performance page)")
        min_lang_prob: float = Field(0.0, ge=0, le=1, description="DataComp uses 0 (top-1 only)")
        langid_model: str | None = Field(None, description="path to lid.176.bin/.ftz; default: bundled .ftz")
        min_words: int | None = Field(3, ge=0, description="DataComp: more than 2 words")
        word_count: Literal["split", "fasttext"] = Field(
            "split", description="how n_words counts: split (Python's str.split, DataComp's basic filter); "
            "fasttext (fastText's tokenizer: ASCII whitespace only, and each newline is a token too, as "
            "DataComp's image-based caption pre-filter counts with fasttext.tokenize)")
        min_chars: int | None = Field(6, ge=0, description="DataComp: more than 5 characters")
        max_chars: int | None = Field(None, ge=1, description="drop captions with more characters")
        min_unique_word_ratio: float | None = Field(None, ge=0, le=1, description="drop captions whose distinct words / words is lower")
        min_alpha_ratio: float | None = Field(None, ge=0, le=1, description="drop captions whose share of letters among non-space characters is lower")
        max_repeat_run: int | None = Field(None, ge=1, description="drop captions that repeat one word more times in a row")
        min_concepts: int | None = Field(None, ge=0, description="text-based baseline: 1")
        concept_vocabulary: str = Field("imagenet21k", description="vocabulary of the concept-word count: imagenet21k, imagenet1k or a file")
        concept_rule: Literal["phrases", "first_sense"] = Field(
            "phrases", description="phrases: whole-word matches of any lemma of the vocabulary (synonyms, "
            "multi-word names); first_sense: DataComp's text-based rule, a whitespace token whose first "
            "WordNet sense is one of the vocabulary's synsets (built-in imagenet21k or imagenet1k only)")
        drop_junk: bool = Field(True, description="drop captions that are file names, URLs, 'untitled' or placeholders")
        normalise: bool = Field(True, description="score the HTML-unescaped, NFKC, whitespace-collapsed caption; "
                                "false: DataComp parity (the raw caption, newlines as spaces)")
        measures: Literal["needed", "all"] | list[Literal[OPTIONAL_MEASURES]] = Field(  # type: ignore[valid-type]
            "needed", description="caption measures beyond language, characters and words: needed (those "
            "the thresholds read), all, or a list; the others stay null")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @model_validator(mode="after")
        def _first_sense_needs_synsets(self):
            if self.concept_rule == "first_sense" and self.concept_vocabulary not in ("imagenet21k", "imagenet1k"):
                raise ValueError(f"concept_rule first_sense matches WordNet synsets: concept_vocabulary must be "
                                 f"imagenet21k or imagenet1k, not {self.concept_vocabulary!r}")
            return self

    def optional_measures(self) -> frozenset[str]:
        """The optional measures this stage computes."""
        p = self.params
        if p.measures == "all":
            return frozenset(OPTIONAL_MEASURES)
        wanted = {m for k, m in THRESHOLD_MEASURE.items() if getattr(p, k) not in (None, False)}
        wanted |= {"lang2"} if p.language_decision == "robust" else set()  # read anyway: the runner-up is kept
        return frozenset(wanted | (set(p.measures) if isinstance(p.measures, list) else set()))

    def index_columns(self) -> set[str]:
        return {"caption"}

    def computed_columns(self, metadata_pool: bool) -> set[str]:
        wanted = self.optional_measures()
        return {f.name for f in self.value_fields() if OPTIONAL_COLUMNS.get(f.name, "") in wanted | {""}}

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("lang", pa.string()), pa.field("lang_prob", pa.float32()),
                pa.field("lang2", pa.string()), pa.field("lang2_prob", pa.float32()),
                pa.field("lang_final", pa.string()), pa.field("lang_rule", pa.string()),
                pa.field("n_chars", pa.int32()), pa.field("n_words", pa.int32()),
                pa.field("unique_word_ratio", pa.float32()), pa.field("alpha_ratio", pa.float32()),
                pa.field("max_repeat_run", pa.int32()), pa.field("n_concepts", pa.int32()),
                pa.field("junk", pa.string())]

    def describe(self) -> dict[str, Any]:
        from curate.models.langid import default_model_path

        return {"langid_model": self.params.langid_model or default_model_path()}

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return {"vocabulary": self.params.concept_vocabulary}

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        return Measured(self.measure_captions(ctx.column("caption", rows)))

    def measure_captions(self, captions: list[str | None]) -> dict[str, list]:
        """Value columns for a list of captions (None allowed)."""
        p = self.params
        model = load_langid(p.langid_model)
        if p.normalise:
            norms = [normalise(c) if c else "" for c in captions]
        else:  # DataComp: fastText on the caption with newlines as spaces; counts on the raw text
            norms = [c.replace("\n", " ") if c else "" for c in captions]
        # the robust decision reads five candidates (the script rule looks past a top-3 that fastText
        # fills with Latin languages); top-1 needs the runner-up only when its column is asked for
        wanted = self.optional_measures()
        n = len(captions)
        k = 5 if p.language_decision == "robust" else 2 if "lang2" in wanted else 1
        if k == 1:  # DataComp's rule: the top-1 label decides, two columns straight from fastText
            lang, lang_prob = top1_languages(model, norms)
            lang2 = lang2_prob = [None] * n
            lang_final, lang_rule = lang, ["fasttext"] * n
        else:
            preds = predict_languages(model, norms, k=k)
            lang, lang_prob = [pr[0][0] if pr else None for pr in preds], [pr[0][1] if pr else None for pr in preds]
            lang2 = [pr[1][0] if len(pr) > 1 else None for pr in preds]
            lang2_prob = [pr[1][1] if len(pr) > 1 else None for pr in preds]
            if p.language_decision == "robust":
                second = second_detector() if p.second_detector else None
                decided = [decide(x, pr, lambda t: predict_languages(model, [t], k=5)[0], second)
                           for x, pr in zip(norms, preds)]
            else:
                decided = [(pr[0][0] if pr else None, "fasttext") for pr in preds]
            lang_final, lang_rule = [d[0] for d in decided], [d[1] for d in decided]
        lowers = [x.lower() for x in norms] if wanted & {"junk", "unique_word_ratio", "max_repeat_run"} else []
        words = [lo.split() for lo in lowers] if wanted & {"unique_word_ratio", "max_repeat_run"} else []
        vals = {
            "lang": lang, "lang_prob": lang_prob, "lang2": lang2, "lang2_prob": lang2_prob,
            "lang_final": lang_final, "lang_rule": lang_rule,
            "n_chars": [len(x) for x in norms],
            "n_words": (split_count(norms) if p.word_count == "split"
                        # parity counts the raw caption: its newlines are tokens to fastText
                        else [fasttext_token_count(c or "") for c in (norms if p.normalise else captions)]),
        } | {m: [None] * n for m in OPTIONAL_MEASURES if m != "lang2"}
        if wanted & {"unique_word_ratio", "max_repeat_run"}:
            n_unique = [len(set(w)) for w in words]
            vals["unique_word_ratio"] = [u / len(w) if w else 0.0 for u, w in zip(n_unique, words)]
            # all words distinct (the common case): the longest run is 1, no scan needed
            vals["max_repeat_run"] = [max_repeat_run(w) if u < len(w) else min(1, u) for u, w in zip(n_unique, words)]
        if "alpha_ratio" in wanted:
            nonspace = [len(x) - x.count(" ") for x in norms]
            vals["alpha_ratio"] = [sum(map(str.isalpha, x)) / k if k else 0.0 for x, k in zip(norms, nonspace)]
        if "n_concepts" in wanted:
            matcher = (FirstSenseMatcher(p.concept_vocabulary) if p.concept_rule == "first_sense"
                       else get_matcher(p.concept_vocabulary, False, 3))
            vals["n_concepts"] = [matcher.count(x) for x in norms]
        if "junk" in wanted:
            vals["junk"] = [junk_kind(x, lo) if c is not None else "empty" for c, x, lo in zip(captions, norms, lowers)]
        # unique ratio and repeat run share a pass; keep only the asked-for one
        return {k: v if OPTIONAL_COLUMNS.get(k, "") in wanted | {""} else [None] * n for k, v in vals.items()}

    def rules(self) -> list[Rule]:
        p = self.params
        col = pl.col
        rules: list[Rule] = []
        if p.languages is not None:
            rules.append((~col("lang_final").is_in(p.languages).fill_null(False),
                          pl.lit("lang:") + col("lang_final").fill_null("None")))
        rules.append((col("lang_prob") < p.min_lang_prob, "lang:low_prob"))
        if p.drop_junk:
            rules.append((col("junk").is_not_null(), pl.lit("caption:junk_") + col("junk")))
        for value, column, op, reason in [
            (p.min_words, "n_words", operator.lt, "caption:too_few_words"),
            (p.min_chars, "n_chars", operator.lt, "caption:too_few_chars"),
            (p.max_chars, "n_chars", operator.gt, "caption:too_many_chars"),
            (p.min_unique_word_ratio, "unique_word_ratio", operator.lt, "caption:low_unique_ratio"),
            (p.min_alpha_ratio, "alpha_ratio", operator.lt, "caption:low_alpha_ratio"),
            (p.max_repeat_run, "max_repeat_run", operator.gt, "caption:repeated_word"),
            (p.min_concepts, "n_concepts", operator.lt, "caption:no_concept"),
        ]:
            if value is not None:  # a null threshold is not applied
                rules.append((op(col(column), value), reason))
        return rules
