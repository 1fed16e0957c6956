"""The WordNet 3.0 noun hierarchy above the ImageNet-21k synsets, from package data
(``curate/data/wordnet_nouns.tsv.gz``, made by ``python -m curate.tools.wordnet_data``).

Synsets are named by ImageNet's wnids (``n`` + the WordNet 3.0 offset); ``depth`` is the shortest
number of hypernym steps to ``entity`` (depth 0), so a small depth means a general concept
(``object`` 2, ``whole`` 3, ``artifact`` 4, ``animal`` 6, ``dog`` 8).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from curate.algorithms.concepts import read_package_data


@dataclass(frozen=True)
class Synset:
    wnid: str
    depth: int
    hypernyms: tuple[str, ...]
    lemmas: tuple[str, ...]


@lru_cache(maxsize=1)
def nouns() -> dict[str, Synset]:
    out: dict[str, Synset] = {}
    for line in read_package_data("wordnet_nouns.tsv.gz").splitlines()[1:]:
        if not line:
            continue
        wnid, depth, hyper, lemmas = line.split("\t")
        out[wnid] = Synset(wnid, int(depth), tuple(h for h in hyper.split(",") if h),
                           tuple(x.strip() for x in lemmas.split(",") if x.strip()))
    return out


def hypernym_lemmas(wnid: str, levels: int, min_depth: int) -> list[str]:
    """Lemmas of the synsets up to ``levels`` hypernym steps above ``wnid``, leaving out those more
    general than ``min_depth`` (``whole``, ``object``: a caption naming them says nothing)."""
    table = nouns()
    out: list[str] = []
    frontier = [wnid]
    seen = {wnid}
    for _ in range(levels):
        frontier = [h for s in frontier if s in table for h in table[s].hypernyms if h not in seen]
        seen.update(frontier)
        out += [lem for h in frontier if h in table and table[h].depth >= min_depth for lem in table[h].lemmas]
    return out


# NLTK's detachment rules (WordNet's morphy) by part of speech: suffix -> replacement.
_DETACH = {"n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
                 ("shes", "sh"), ("men", "man"), ("ies", "y")),
           "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                 ("ing", "")),
           "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
           "r": ()}
POS_ORDER = ("n", "v", "a", "r")  # the order in which wordnet.synsets(word) lists senses


@dataclass(frozen=True)
class FirstSenses:
    """WordNet 3.0's first sense of every lemma per part of speech, and the exception lists
    (package data ``wordnet_first_senses.tsv.gz``, made by ``python -m curate.tools.wordnet_data``)."""
    first: dict[str, tuple[int | None, ...]]  # lemma -> first offset per POS_ORDER
    exceptions: dict[str, dict[str, tuple[str, ...]]]  # pos -> inflected form -> base forms

    def lemmas_of(self, word: str, pos: str) -> list[str]:
        """The base forms of ``word`` in ``pos`` that WordNet lists, as NLTK 3.8.1's ``_morphy``
        (DataComp's pin): the word itself and its exception-list bases; else the word and each
        detachment rule applied once; while none is in WordNet, the rules applied again to the forms
        derived ("womens" -> "women" -> "woman")."""
        k = POS_ORDER.index(pos)

        def listed(forms: list[str]) -> list[str]:
            out: list[str] = []
            for f in forms:
                if f not in out and f in self.first and self.first[f][k] is not None:
                    out.append(f)
            return out

        def detach(forms: list[str]) -> list[str]:
            return [f[: -len(old)] + new for f in forms for old, new in _DETACH[pos] if f.endswith(old)]

        bases = self.exceptions[pos].get(word)
        if bases is not None:
            return listed([word, *bases])
        forms = detach([word])
        found = listed([word, *forms])
        while not found and forms:
            forms = detach(forms)
            found = listed(forms)
        return found

    def first_sense(self, word: str) -> int | None:
        """The offset of ``wordnet.synsets(word)[0]`` (None when WordNet has no sense): the word in
        lower case, parts of speech in NLTK's order, the first base form's most frequent sense."""
        word = word.lower()
        for k, pos in enumerate(POS_ORDER):
            forms = self.lemmas_of(word, pos)
            if forms:
                return self.first[forms[0]][k]
        return None


@lru_cache(maxsize=1)
def first_senses() -> FirstSenses:
    text = read_package_data("wordnet_first_senses.tsv.gz")
    head, _, exc = text.partition("#exceptions\n")
    first = {}
    for line in head.splitlines()[1:]:
        lemma, *offsets = line.split("\t")
        first[lemma] = tuple(int(o) if o else None for o in offsets)
    exceptions: dict[str, dict[str, tuple[str, ...]]] = {p: {} for p in POS_ORDER}
    for line in exc.splitlines():
        pos, form, bases = line.split("\t")
        exceptions[pos][form] = tuple(bases.split())
    return FirstSenses(first, exceptions)


@lru_cache(maxsize=4)
def imagenet_offsets(vocabulary: str) -> frozenset[int]:
    """WordNet offsets of a built-in ImageNet vocabulary's synsets: ``imagenet21k`` is the list of
    21,843 wnids DataComp's text-based baseline reads, ``imagenet1k`` the 1,000 classes."""
    if vocabulary == "imagenet21k":
        wnids = read_package_data("imagenet21k_wnids.txt.gz").split()
    elif vocabulary == "imagenet1k":
        wnids = [ln.split("\t")[1] for ln in read_package_data("imagenet1k_classnames.tsv.gz").splitlines()[1:] if ln]
    else:
        raise ValueError(f"first-sense matching needs a built-in ImageNet vocabulary, not {vocabulary!r}")
    return frozenset(int(w[1:]) for w in wnids)


class FirstSenseMatcher:
    """DataComp's text-based rule: a whitespace token (punctuation left on it) names a concept when
    its first WordNet sense (any part of speech) has an offset in the vocabulary's synsets."""

    def __init__(self, vocabulary: str = "imagenet21k"):
        self._senses = first_senses()
        self._offsets = imagenet_offsets(vocabulary)
        self._hit = lru_cache(maxsize=1 << 18)(self._token_hit)

    def _token_hit(self, token: str) -> bool:
        return self._senses.first_sense(token) in self._offsets

    def count(self, text: str) -> int:
        """How many whitespace tokens of ``text`` name a concept."""
        return sum(map(self._hit, text.split()))
