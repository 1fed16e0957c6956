"""Regenerate ``datacomp_text_based.json``: which captions DataComp's text-based rule accepts, computed
with NLTK's WordNet as DataComp's baseline computes it (a whitespace token whose
``wordnet.synsets(token)[0].offset()`` is one of the 21,843 ImageNet-21k offsets).

NLTK is not a curate dependency; to regenerate, with DataComp's pinned ``pip install nltk==3.8.1`` and
Debian's ``wordnet-base``:

    python tests/data/make_datacomp_text_based.py /usr/share/wordnet WNIDS.txt LAION.parquet

WNIDS.txt: the 21,843 ImageNet-21k wnids, one a line; LAION.parquet: captions in a ``TEXT`` column.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

EDGE = ["Flowers in a garden", "dog, on the beach", "dog on the beach", "GEESE flying south",
        "a teddy on a bed", "an aromatic smell", "an aromatic morning", "men at work", "the of and",
        "a running man", "he ran away", "new_york at night", "axes and hammers", "better days ahead",
        "a&nbsp;photo&nbsp;of&nbsp;a&nbsp;tree", "a\u00a0photo\u00a0of a red car", "ａ ｐｈｏｔｏ ｏｆ ａ ｃａｔ",
        "a photo of\na mountain lake", "Dogs.", "(cat)", "cats!", "a mossy stone", "", "   ",
        "ein Foto von einem Hund am Strand", "une photo d'un chat sur le canapé", "leaves in autumn",
        "mice and men", "the children's toys", "wolves howling", "glasses on a table", "A BOY WITH A BLUE SHIRT",
        "teddy", "my teddy", "aromatic", "so cogent", "mossy",
        # NLTK 3.8.1 (DataComp's pin) applies the suffix rules again to forms it derived until one is in
        # WordNet ("womens" -> "women" -> "woman"); later NLTK releases apply them once
        "womens shoes", "princessess crowns", "the mens room", "boxeses of toys", "dresseses on sale",
        "glasseses", "churcheses in town", "wishes"]


def _wordnet(wordnet_dir: Path):
    """NLTK's reader over a WordNet 3.0 database folder (copied: NLTK reads only under its data path)."""
    import nltk

    data = Path(tempfile.mkdtemp())
    root = data / "corpora" / "wordnet"
    root.mkdir(parents=True)
    for f in wordnet_dir.iterdir():
        if f.is_file():
            shutil.copy(f, root / f.name)
    names = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()
    pos = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    (root / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{pos[n.split('.')[0]]}\n" for i, n in enumerate(names)))
    nltk.data.path.insert(0, str(data))
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    WordNetCorpusReader.map_wn = lambda self, version="wordnet": {}  # needs index.sense (not in wordnet-base)
    from nltk.corpus import wordnet

    return wordnet


def main(wordnet_dir: str, wnids: str, laion: str) -> None:
    import nltk
    import polars as pl

    wn = _wordnet(Path(wordnet_dir))
    ids = {int(x.strip()[1:]) for x in open(wnids) if x.strip()}

    def contains(text: str) -> bool:
        return any((s := wn.synsets(w)) and s[0].offset() in ids for w in text.split())

    caps = EDGE + [c for c in pl.read_parquet(laion)["TEXT"].to_list() if c][:400]
    out = {"made_with": f"nltk {nltk.__version__} wordnet.synsets(word)[0].offset() on WordNet 3.0 (Debian "
                        f"wordnet-base), {len(ids):,} ImageNet-21k wnids, as DataComp's does_contain_text_entity",
           "source": "hand-written edge cases, then the first 400 captions of a LAION-400M sample (CC-BY 4.0 metadata)",
           "captions": caps, "contains_in21k": [contains(c) for c in caps]}
    Path(__file__).with_name("datacomp_text_based.json").write_text(json.dumps(out, ensure_ascii=False, indent=0))


if __name__ == "__main__":
    main(*sys.argv[1:4])
