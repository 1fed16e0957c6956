"""Subprocess entry for open_clip's own training code, with curate's architectures registered.

Run as ``python -m curate.models.train_entry <open_clip_train args>``; a subprocess keeps
open_clip_train's logging setup and torch state out of the caller.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from curate.models.clip import register_configs

    register_configs()
    from open_clip_train.main import main as train_main

    return int(train_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
