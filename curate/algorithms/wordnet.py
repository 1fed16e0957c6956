"""The WordNet 3.0 noun hierarchy above the ImageNet-21k synsets, from package data
(``curate/data/wordnet_nouns.tsv.gz``, made by ``python -m curate.tools.wordnet_data``).

Synsets are named by ImageNet's wnids (``n`` + the WordNet 3.0 offset); ``depth`` is the shortest
number of hypernym steps to ``entity`` (depth 0), so a small depth means a general concept
(``object`` 2, ``whole`` 3, ``artifact`` 4, ``animal`` 6, ``dog`` 8).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from curate.algorithms.concepts import _read_data


@dataclass(frozen=True)
class Synset:
    wnid: str
    depth: int
    hypernyms: tuple[str, ...]
    lemmas: tuple[str, ...]


@lru_cache(maxsize=1)
def nouns() -> dict[str, Synset]:
    out: dict[str, Synset] = {}
    for line in _read_data("wordnet_nouns.tsv.gz").splitlines()[1:]:
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
