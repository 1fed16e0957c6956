"""Regenerate the WordNet package data:

- ``curate/data/wordnet_nouns.tsv.gz``: the WordNet 3.0 noun hierarchy above the ImageNet-21k
  synsets (their lemmas, hypernyms and depth), which the classifier stage reads to accept a caption
  that names a concept's synonym or hypernym;
- ``curate/data/wordnet_first_senses.tsv.gz``: every lemma of the four index files with the offset of
  its first sense per part of speech, and the exception lists (``geese`` -> ``goose``), from which the
  text stage finds a word's first WordNet sense as NLTK's ``wordnet.synsets(word)[0]`` does (DataComp's
  text-based baseline).

The package ships the generated file; nothing reads WordNet at run time. To regenerate, point this
at a WordNet 3.0 database folder (Debian: ``apt-get install wordnet-base`` -> /usr/share/wordnet):

    python -m curate.tools.wordnet_data /usr/share/wordnet

ImageNet wnids are WordNet 3.0 noun offsets (``n`` + 8 digits), so the database's ``data.noun``
(format: wndb(5)) is read directly; an index line is ``lemma pos synset_cnt p_cnt ptr* sense_cnt
tagsense_cnt offset*`` with the offsets in sense order (most frequent first). In ``data.noun``: ``offset lexfile pos n_words (word lex_id)* n_ptrs (ptr)* | gloss``,
where a pointer is ``symbol offset pos source/target``; ``@`` and ``@i`` are (instance) hypernyms.
"""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

from curate.algorithms.concepts import read_package_data

DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "wordnet_nouns.tsv.gz"
FIRST_SENSES = DATA / "wordnet_first_senses.tsv.gz"
POS_FILES = (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv"))  # NLTK's order of parts of speech


def parse_data_noun(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """wnid -> (lemmas, hypernym wnids) for every noun synset of a wndb ``data.noun``."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            p = 4 + 2 * n_words
            n_ptrs = int(fields[p])
            hyper = [f"n{fields[p + 2 + 4 * i]}" for i in range(n_ptrs)
                     if fields[p + 1 + 4 * i] in ("@", "@i") and fields[p + 3 + 4 * i] == "n"]
            # lemma markers such as "(a)" or "(p)" belong to adjectives; strip any that appear
            out[f"n{fields[0]}"] = ([w.split("(")[0] for w in words], hyper)
    return out


def closure(nouns: dict[str, tuple[list[str], list[str]]], seeds: list[str]) -> list[str]:
    """``seeds`` and every synset above them, in first-seen order."""
    seen: dict[str, None] = {}
    stack = [s for s in reversed(seeds) if s in nouns]
    while stack:
        s = stack.pop()
        if s in seen:
            continue
        seen[s] = None
        stack.extend(h for h in reversed(nouns[s][1]) if h not in seen)
    return list(seen)


def depths(nouns: dict[str, tuple[list[str], list[str]]], wnids: list[str]) -> dict[str, int]:
    """Shortest number of hypernym steps from each synset to a root (``entity`` is 0)."""
    memo: dict[str, int] = {}

    def depth(s: str) -> int:
        if s not in memo:
            hyper = [h for h in nouns[s][1] if h in nouns]
            memo[s] = 0 if not hyper else 1 + min(depth(h) for h in hyper)
        return memo[s]

    sys.setrecursionlimit(10_000)
    return {s: depth(s) for s in wnids}


def build(wordnet_dir: Path) -> bytes:
    nouns = parse_data_noun(wordnet_dir / "data.noun")
    seeds = [ln.split("\t")[0] for ln in read_package_data("imagenet21k_synset_lemmas.txt.gz").splitlines() if ln]
    seeds += [ln.split("\t")[1] for ln in read_package_data("imagenet1k_classnames.tsv.gz").splitlines()[1:] if ln]
    wnids = sorted(closure(nouns, seeds))
    depth = depths(nouns, wnids)
    lines = ["wnid\tdepth\thypernyms\tlemmas"]
    for s in wnids:
        lemmas, hyper = nouns[s]
        lines.append(f"{s}\t{depth[s]}\t{','.join(h for h in hyper if h in nouns)}\t{', '.join(lemmas)}")
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def build_first_senses(wordnet_dir: Path) -> bytes:
    """``lemma<TAB>n<TAB>v<TAB>a<TAB>r`` (first offsets, empty where the lemma lacks that part of
    speech), then ``#exceptions`` and ``pos<TAB>inflected<TAB>base base...`` lines."""
    first: dict[str, dict[str, str]] = {}
    for pos, name in POS_FILES:
        with open(wordnet_dir / f"index.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                fields = line.split()
                n_synsets = int(fields[2])
                first.setdefault(fields[0], {})[pos] = str(int(fields[-n_synsets]))
    lines = ["lemma\tn\tv\ta\tr"]
    lines += [f"{lemma}\t" + "\t".join(first[lemma].get(p, "") for p, _ in POS_FILES) for lemma in sorted(first)]
    lines.append("#exceptions")
    for pos, name in POS_FILES:
        with open(wordnet_dir / f"{name}.exc", encoding="utf-8", errors="replace") as f:
            for line in f:
                form, *bases = line.split()
                lines.append(f"{pos}\t{form}\t{' '.join(bases)}")
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wordnet_dir", type=Path, help="WordNet 3.0 database folder (holds data.noun)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--first-senses-out", type=Path, default=FIRST_SENSES)
    a = ap.parse_args(argv)
    if not (a.wordnet_dir / "data.noun").is_file():
        print(f"error: {a.wordnet_dir}/data.noun not found (Debian: apt-get install wordnet-base)", file=sys.stderr)
        return 2
    a.out.write_bytes(build(a.wordnet_dir))
    a.first_senses_out.write_bytes(build_first_senses(a.wordnet_dir))
    print(f"wrote {a.out} and {a.first_senses_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
