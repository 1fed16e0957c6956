"""Concept vocabularies and whole-phrase matching of captions against all entries at once.

Matching follows MetaCLIP's substring matching: the caption gets spaces around punctuation and
around itself, each entry is padded with spaces, and an Aho-Corasick automaton (pyahocorasick)
finds every padded entry in one pass. Case-sensitive by default, as MetaCLIP.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

import ahocorasick

_PUNCT_TO_WRAP = (",", ".", ";", ":", "?", "!", "`", "(", ")", '"')
_TO_SPACE = ("\t", "\n", "\r")


def read_package_data(name: str) -> str:
    """A file of ``curate/data/`` as text (gunzipped when its name ends in .gz)."""
    raw = resources.files("curate").joinpath("data", name).read_bytes()
    return gzip.decompress(raw).decode("utf-8") if name.endswith(".gz") else raw.decode("utf-8")


def _imagenet21k() -> list[str]:
    out: list[str] = []
    for line in read_package_data("imagenet21k_synset_lemmas.txt.gz").splitlines():
        _, _, lemmas = line.partition("\t")
        out.extend(lem.strip() for lem in lemmas.split(",") if lem.strip())
    return out


def _imagenet1k() -> list[str]:
    lines = read_package_data("imagenet1k_classnames.tsv.gz").splitlines()[1:]
    return [ln.split("\t")[2].strip() for ln in lines if ln.count("\t") >= 2]


# Built-in vocabularies by name; any other value is a path to a file with one entry a line.
BUILTIN: dict[str, Callable[[], list[str]]] = {"imagenet21k": _imagenet21k, "imagenet1k": _imagenet1k}


@dataclass(frozen=True)
class Vocabulary:
    name: str
    entries: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.entries).encode()).hexdigest()


@lru_cache(maxsize=8)
def load_vocabulary(source: str = "imagenet21k") -> Vocabulary:
    """A built-in vocabulary by name, or a user file (one entry a line, lines starting with ``#``
    are comments); unique, in first-seen order."""
    if source in BUILTIN:
        raw = BUILTIN[source]()
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"vocabulary {source!r}: not a built-in ({', '.join(BUILTIN)}) "
                                    "and no such file")
        raw = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")]
    seen: dict[str, None] = {}
    for e in raw:
        if e and e not in seen:
            seen[e] = None
    return Vocabulary(source, tuple(seen))


def spacing(text: str) -> str:
    """MetaCLIP's normalisation: punctuation split off, whitespace unified, spaces at both ends."""
    for ch in _TO_SPACE:
        text = text.replace(ch, " ")
    for p in _PUNCT_TO_WRAP:
        if p in text:
            text = text.replace(p, f" {p} ")
    return f" {text} "


class ConceptMatcher:
    """Whole-phrase matches of a caption against every vocabulary entry (entry ids, sorted)."""

    def __init__(self, vocab: Vocabulary, case_sensitive: bool = True, min_entry_chars: int = 1):
        self.vocab = vocab
        self.case_sensitive = case_sensitive
        self._auto = ahocorasick.Automaton()
        for i, e in enumerate(vocab.entries):
            if len(e) < min_entry_chars:
                continue  # e.g. WordNet's "A" (vitamin A) would match every article
            key = f" {e if case_sensitive else e.lower()} "
            # Two entries equal after lowercasing share one key: keep the first id.
            if key not in self._auto:
                self._auto.add_word(key, i)
        self._auto.make_automaton()

    def match(self, text: str | None) -> list[int]:
        if not text:
            return []
        s = spacing(text if self.case_sensitive else text.lower())
        return sorted({i for _, i in self._auto.iter(s)})

    def count(self, text: str | None) -> int:
        """len(match(text)), without building the sorted list."""
        if not text:
            return 0
        return len({i for _, i in self._auto.iter(spacing(text if self.case_sensitive else text.lower()))})


@lru_cache(maxsize=4)
def get_matcher(source: str = "imagenet21k", case_sensitive: bool = True,
                min_entry_chars: int = 1) -> ConceptMatcher:
    """One automaton per process and vocabulary (building the 21k-entry one is worth doing once)."""
    return ConceptMatcher(load_vocabulary(source), case_sensitive, min_entry_chars)
