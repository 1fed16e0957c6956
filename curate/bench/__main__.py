"""`make bench` / `python -m curate.bench [names...]`: run benchmarks, print and save figures."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module with a run() function; each module benchmarks one stage against its raw operation.
BENCHMARKS = {
    "index": "curate.bench.index",
    "filters": "curate.bench.filters",
    "clip": "curate.bench.clip",
    "global": "curate.bench.global_stages",
    "recipes": "curate.bench.recipes",
    "datacomp": "curate.bench.datacomp",
    "langid": "curate.bench.langid",
    "classifier": "curate.bench.classifier",
    "caption_dedup": "curate.bench.caption_dedup",
    "clip_loss": "curate.bench.clip_loss",
    "fusion": "curate.bench.fusion",
    "text_mask": "curate.bench.text_mask",
    "storage": "curate.bench.storage",
    "nsfw": "curate.bench.nsfw",
    "privacy": "curate.bench.privacy",
    "captions": "curate.bench.captions",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="curate.bench")
    ap.add_argument("names", nargs="*", help=f"subset of {', '.join(BENCHMARKS)}")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = a.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for n in names:
        importlib.import_module(BENCHMARKS[n]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
