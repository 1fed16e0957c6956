"""MkDocs hook: the reference pages are generated from the code at build time (nothing generated
is committed, so a new stage shows in the docs with no other file changed)."""
from __future__ import annotations

from mkdocs.structure.files import File


def on_files(files, config):
    from curate.reference_docs import PAGES

    for name, make in PAGES.items():
        files.append(File.generated(config, f"reference/{name}", content=make()))
    return files
