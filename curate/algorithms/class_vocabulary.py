"""Class vocabularies for zero-shot classification, and which caption words confirm a class.

A class has a name (put into the prompt templates) and the phrases a caption may use for it: its
WordNet synonyms and, within a number of hypernym steps, its hypernyms ("golden retriever" is
confirmed by "retriever" or "dog"). Captions are matched as MetaCLIP matches concepts: whole
phrases, lower-cased, in one Aho-Corasick pass (``ConceptMatcher``), plural forms included.

Sources: ``imagenet1k`` (CLIP's 1,000 class names, WordNet relations from their wnids),
``imagenet21k`` (21,843 WordNet synsets, first lemma as the name), or a text file, one class a
line: ``name, synonym, ...`` or a wnid (``n02084071``) for a WordNet synset; ``#`` starts a comment.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from curate.algorithms.concepts import ConceptMatcher, Vocabulary, read_package_data
from curate.algorithms.wordnet import hypernym_lemmas, nouns

BUILTIN = ("imagenet1k", "imagenet21k")
_WNID = re.compile(r"^n\d{8}$")


class VocabularyError(ValueError):
    """A class vocabulary that cannot be used (unknown name, missing or empty file, unknown wnid)."""


@dataclass(frozen=True)
class ClassVocabulary:
    source: str
    names: tuple[str, ...]  # what the prompt templates name
    synonyms: tuple[tuple[str, ...], ...]  # per class, the phrases besides the hypernyms
    wnids: tuple[str | None, ...]  # per class, its WordNet synset when known

    @property
    def sha256(self) -> str:
        body = "\n".join(f"{n}\t{w}\t{'|'.join(s)}" for n, w, s in zip(self.names, self.wnids, self.synonyms))
        return hashlib.sha256(body.encode()).hexdigest()


def _imagenet1k() -> list[tuple[str, str | None, list[str]]]:
    table = nouns()
    out = []
    for line in read_package_data("imagenet1k_classnames.tsv.gz").splitlines()[1:]:
        if line.count("\t") >= 2:
            _, wnid, name = line.split("\t")[:3]
            out.append((name.strip(), wnid, [name.strip(), *table[wnid].lemmas] if wnid in table else [name.strip()]))
    return out


def _imagenet21k() -> list[tuple[str, str | None, list[str]]]:
    out = []
    for line in read_package_data("imagenet21k_synset_lemmas.txt.gz").splitlines():
        wnid, _, lemmas = line.partition("\t")
        names = [x.strip() for x in lemmas.split(",") if x.strip()]
        if names:
            out.append((names[0], wnid, names))
    return out


def _from_file(path: Path) -> list[tuple[str, str | None, list[str]]]:
    table = nouns()
    out = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if _WNID.match(line):
            if line not in table:
                raise VocabularyError(f"{path}:{n}: {line} is not a WordNet 3.0 noun synset of ImageNet-21k")
            out.append((table[line].lemmas[0], line, list(table[line].lemmas)))
        else:
            words = [w.strip() for w in line.split(",") if w.strip()]
            out.append((words[0], None, words))
    return out


@lru_cache(maxsize=8)
def load_classes(source: str = "imagenet1k") -> ClassVocabulary:
    """A built-in class vocabulary by name, or a file (see the module doc)."""
    if source == "imagenet1k":
        rows = _imagenet1k()
    elif source == "imagenet21k":
        rows = _imagenet21k()
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise VocabularyError(f"vocabulary {source!r}: not a built-in ({', '.join(BUILTIN)}) and no such file")
        rows = _from_file(p)
    if not rows:
        raise VocabularyError(f"vocabulary {source!r} holds no class")
    return ClassVocabulary(source, tuple(r[0] for r in rows), tuple(tuple(dict.fromkeys(r[2])) for r in rows),
                           tuple(r[1] for r in rows))


def plural_forms(phrase: str) -> list[str]:
    """The phrase and the regular plurals of its last word (dog -> dogs, box -> boxes, puppy -> puppies)."""
    forms = [phrase, phrase + "s"]
    if phrase.endswith(("s", "x", "z", "ch", "sh")):
        forms.append(phrase + "es")
    if len(phrase) > 2 and phrase.endswith("y") and phrase[-2] not in "aeiou":
        forms.append(phrase[:-1] + "ies")
    return forms


class CaptionConfirmer:
    """Which of a class's phrases (synonyms, hypernyms within ``levels`` steps no more general than
    ``min_depth``) a caption names."""

    def __init__(self, vocab: ClassVocabulary, levels: int, min_depth: int):
        phrases: dict[str, int] = {}
        self.accepts: list[frozenset[int]] = []
        for syn, wnid in zip(vocab.synonyms, vocab.wnids):
            words = list(syn) + (hypernym_lemmas(wnid, levels, min_depth) if wnid and levels > 0 else [])
            ids = {phrases.setdefault(f, len(phrases)) for w in words for f in plural_forms(w.lower())}
            self.accepts.append(frozenset(ids))
        self.phrases = list(phrases)
        self._matcher = ConceptMatcher(Vocabulary("classes", tuple(self.phrases)), case_sensitive=False,
                                       min_entry_chars=2)

    def confirmed_by(self, caption: str | None, classes: list[int]) -> str | None:
        """The longest phrase in ``caption`` that confirms the first of ``classes`` (in their order)
        confirmed at all, or None."""
        found = set(self._matcher.match(caption))
        if not found:
            return None
        for c in classes:
            hit = self.accepts[c] & found
            if hit:
                return self.phrases[max(hit, key=lambda i: (len(self.phrases[i]), -i))]
        return None
