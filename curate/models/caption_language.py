"""A language decision for captions that uses more than fastText's top-1.

Captions are short, often upper-case, often a brand or place name in English words; fastText's
top-1 alone misreads many of them. On top of fastText (kept as the value columns), in order:

1. ``uppercase``: a caption mostly in capitals is predicted again in lower case (fastText learned
   from running text, where capitals are rare); the lower-case answer wins when it is surer.
2. ``script``: a language whose script the caption does not use is impossible (a caption in Latin
   letters cannot be ``ja``): the best candidate whose script matches wins.
3. ``function_words``: when fastText is unsure (top-1 below ``unsure_below``) and English is among
   its candidates, a caption made largely of English function words ("a", "on", "with", "the") is
   English.
4. ``english_words``: when fastText's top-1 is a language near English in what short text looks
   like (a Germanic, Romance or other Latin-script European language) with probability at most
   ``near_at_most``, English is among its candidates, and every word of a caption of two or more
   words is an English word (a WordNet lemma in any inflection, or a function word), it is English:
   "image of a door handle" is not Dutch.
5. ``second_detector``: when fastText is not sure (top-1 below ``sure_above``) or the caption is
   short (``short_words`` words or fewer), a detector made for short text (lingua, whose models ship
   in its wheel) is asked. It knows languages lid.176 lacks (fastText calls Somali or Zulu English
   with a low probability) and tells single words apart better. Its answer wins only when it
   clearly disagrees: fastText's language stands while lingua gives it at least ``keep_ratio`` of
   lingua's own top confidence ("vintage car": lingua da 0.12, en 0.08: still English).

Otherwise the rule is ``fasttext`` (its top-1). The decision is deterministic; it costs a second
fastText prediction for upper-case captions and a lingua call for unsure or short ones.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Languages of lid.176 written in a script other than Latin (others default to Latin).
SCRIPT_OF = {
    **dict.fromkeys(["ru", "uk", "be", "bg", "mk", "sr", "kk", "ky", "mn", "tg", "tt", "ba", "ce", "cv",
                     "os", "sah", "mhr", "mrj", "udm", "kv", "xal", "myv", "bxr"], "CYRILLIC"),
    **dict.fromkeys(["ar", "fa", "ur", "ps", "ckb", "sd", "ug", "arz", "azb", "pnb", "mzn", "glk"], "ARABIC"),
    **dict.fromkeys(["he", "yi"], "HEBREW"), "el": "GREEK", "hy": "ARMENIAN", "ka": "GEORGIAN",
    **dict.fromkeys(["hi", "mr", "ne", "sa", "bh", "new", "mai", "gom", "bpy"], "DEVANAGARI"),
    "bn": "BENGALI", "as": "BENGALI", "pa": "GURMUKHI", "gu": "GUJARATI", "or": "ORIYA", "ta": "TAMIL",
    "te": "TELUGU", "kn": "KANNADA", "ml": "MALAYALAM", "si": "SINHALA", "th": "THAI", "lo": "LAO",
    "bo": "TIBETAN", "my": "MYANMAR", "km": "KHMER", "am": "ETHIOPIC", "dv": "THAANA",
    "ja": "CJK", "zh": "CJK", "wuu": "CJK", "yue": "CJK", "ko": "HANGUL",
}
# Script words as they start Unicode character names; kana counts as CJK (Japanese).
_NAME_SCRIPTS = ("LATIN", "CYRILLIC", "ARABIC", "HEBREW", "GREEK", "ARMENIAN", "GEORGIAN", "DEVANAGARI",
                 "BENGALI", "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM",
                 "SINHALA", "THAI", "LAO", "TIBETAN", "MYANMAR", "KHMER", "ETHIOPIC", "THAANA", "HANGUL")
# The commonest language of each script, for a caption whose script none of fastText's candidates
# uses (very short non-Latin text gets fastText's no-information answer, which starts with "en").
SCRIPT_DEFAULT = {"CYRILLIC": "ru", "ARABIC": "ar", "HEBREW": "he", "GREEK": "el", "ARMENIAN": "hy",
                  "GEORGIAN": "ka", "DEVANAGARI": "hi", "BENGALI": "bn", "GURMUKHI": "pa", "GUJARATI": "gu",
                  "ORIYA": "or", "TAMIL": "ta", "TELUGU": "te", "KANNADA": "kn", "MALAYALAM": "ml",
                  "SINHALA": "si", "THAI": "th", "LAO": "lo", "TIBETAN": "bo", "MYANMAR": "my", "KHMER": "km",
                  "ETHIOPIC": "am", "THAANA": "dv", "HANGUL": "ko", "CJK": "zh"}
# Latin-script languages whose short text fastText confuses with short English text.
NEAR_ENGLISH = frozenset("nl de da sv no nb nn af fy lb is es pt it fr ca gl ro la eo oc hu fi et cy ga sq tl id ms sw "
                         "sl hr cs pl sk lt lv tr vi".split())
ENGLISH_FUNCTION_WORDS = frozenset(
    "a an the and or but of in on at to for from with without by as into onto over under near behind "
    "up down out off about above below between through during before after while is are was were be "
    "been being has have had do does did this that these those it its his her their our my your "
    "he she they we you i me him them us who which what where when there here some two three one "
    "very not no".split())


@lru_cache(maxsize=4096)
def _char_script(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK", "HIRAGANA", "KATAKANA")):
        return "CJK"
    return next((s for s in _NAME_SCRIPTS if name.startswith(s)), None)


def _is_kana(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("HIRAGANA", "KATAKANA"))


def dominant_script(text: str) -> str | None:
    """The script of most letters of ``text`` (None without letters)."""
    if text.isascii():  # the common case, without a look at each character's name
        return "LATIN" if any(ch.isalpha() for ch in text) else None
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            s = _char_script(ch)
            if s:
                counts[s] = counts.get(s, 0) + 1
    return max(counts, key=counts.get) if counts else None


def mostly_upper(text: str) -> bool:
    if text.islower() or not text.isupper() and sum(map(str.isupper, text)) < 4:
        return False
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 4 and sum(c.isupper() for c in letters) >= 0.6 * len(letters)


def function_word_share(text: str) -> tuple[int, float]:
    words = [w.strip(".,;:!?\"'()[]") for w in text.lower().split()]
    hits = sum(w in ENGLISH_FUNCTION_WORDS for w in words)
    return hits, hits / len(words) if words else 0.0


def english_words_only(text: str, min_words: int = 2) -> bool:
    """At least ``min_words`` words, each an English word: a function word or a WordNet lemma in
    any inflection (WordNet 3.0 ships as package data)."""
    from curate.algorithms.wordnet import first_senses

    words = [w for w in (t.strip(".,;:!?\"'()[]-") for t in text.lower().split()) if w]
    if len(words) < min_words:
        return False
    senses = first_senses()
    return all(w in ENGLISH_FUNCTION_WORDS or senses.first_sense(w) is not None for w in words)


class SecondDetector:
    """lingua over all its languages, models loaded as first needed."""

    ALIASES = {"no": "nb"}  # lid.176's Norwegian is lingua's Bokmal

    def __init__(self):
        from lingua import LanguageDetectorBuilder

        self._detector = LanguageDetectorBuilder.from_all_languages().build()

    def __call__(self, text: str, lang: str) -> tuple[str | None, float, float]:
        """(lingua's language, its confidence, lingua's confidence in ``lang``); None when lingua
        cannot tell."""
        conf = self._detector.compute_language_confidence_values(text)
        if not conf:
            return None, 0.0, 0.0
        want = self.ALIASES.get(lang, lang)
        mine = next((c.value for c in conf if c.language.iso_code_639_1.name.lower() == want), 0.0)
        return conf[0].language.iso_code_639_1.name.lower(), conf[0].value, mine


@lru_cache(maxsize=1)
def second_detector() -> SecondDetector:
    return SecondDetector()


@dataclass(frozen=True)
class Thresholds:
    unsure_below: float = 0.5  # function-word rule: fastText's top-1 below this
    sure_above: float = 0.5  # second detector: fastText's top-1 below this...
    short_words: int = 3  # ...or a caption of this many words or fewer
    near_at_most: float = 0.9  # english-words rule: a near language's top-1 at most this sure
    # fastText's language stands while lingua gives it at least this share of lingua's own top
    # confidence: the second opinion overrides a clear disagreement, not a near tie
    keep_ratio: float = 0.5


def decide(text: str, preds: list[tuple[str, float]], repredict, second=None,
           th: Thresholds = Thresholds()) -> tuple[str | None, str]:
    """(language, rule) for one caption from fastText's candidates ``preds`` (best first);
    ``repredict(text)`` gives candidates for another form of the text; ``second(text)``, when
    given, is the second detector."""
    if not preds:
        return None, "fasttext"
    rule = "fasttext"
    if mostly_upper(text):
        lowered = repredict(text.lower())
        if lowered and lowered[0][0] != preds[0][0] and lowered[0][1] > preds[0][1]:
            preds, rule = lowered, "uppercase"
    script = dominant_script(text)
    if script is not None and SCRIPT_OF.get(preds[0][0], "LATIN") != script:
        fits = [c for c in preds if SCRIPT_OF.get(c[0], "LATIN") == script]
        if fits:
            preds, rule = fits, "script"
        elif script != "LATIN":
            kana = script == "CJK" and any(_is_kana(ch) for ch in text)
            return ("ja" if kana else SCRIPT_DEFAULT.get(script)), "script"
    top, p = preds[0]
    if top != "en" and p < th.unsure_below and any(c[0] == "en" for c in preds):
        hits, share = function_word_share(text)
        if hits >= 2 and share >= 0.3:
            return "en", "function_words"
    if (top in NEAR_ENGLISH and p <= th.near_at_most and any(c[0] == "en" for c in preds)
            and english_words_only(text)):
        return "en", "english_words"
    if second is not None and rule != "script" and (p < th.sure_above or len(text.split()) <= th.short_words):
        other, other_conf, top_conf = second(text, top)
        if other is not None and other != SecondDetector.ALIASES.get(top, top) and top_conf < th.keep_ratio * other_conf:
            return other, "second_detector"
    return top, rule
