"""Evaluation-set copies: pool rows whose image is byte-identical to an evaluation image (sha256),
within a pHash radius of one, or (given their embeddings) at or above a cosine of one."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl

from curate.algorithms.phash import near_pairs
from curate.io.shards import expand_input, iter_samples


def source_files(sources: list[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every file under the evaluation sources (a stage's fingerprint)."""
    files = []
    for src in sources:
        p = Path(src)
        for f in (sorted(p.rglob("*")) if p.is_dir() else [p]):
            if f.is_file():
                st = f.stat()
                files.append((str(f), st.st_size, int(st.st_mtime)))
    return files


def load_eval_hashes(sources: list[str]) -> tuple[set[str], list[int]]:
    """sha256 and pHash of every evaluation image (a folder of images, or WebDataset shards)."""
    from curate.algorithms.phash import phash
    from curate.io.images import reduced_decode

    shas: set[str] = set()
    hashes: list[int] = []

    def add(data: bytes, ext: str | None) -> None:
        shas.add(hashlib.sha256(data).hexdigest())
        try:
            rgb, _ = reduced_decode(data, ext, 128, 100_000_000)
            hashes.append(phash(rgb))
        except Exception:  # an undecodable eval image still matches by sha256
            pass

    for src in sources:
        p = Path(src)
        if p.is_dir() and not any(p.glob("*.tar")):
            for f in sorted(p.rglob("*")):
                if f.suffix.lower().lstrip(".") in ("jpg", "jpeg", "png", "webp", "bmp", "gif"):
                    add(f.read_bytes(), f.suffix.lower().lstrip("."))
        else:
            for shard in expand_input(str(p)):
                for s in iter_samples(shard):
                    if s.image():
                        add(s.image(), s.image_ext())
    return shas, hashes


def eval_matches(df: pl.DataFrame, sources: list[str], phash_radius: int | None,
                 embeddings: str | None = None, min_cosine: float = 0.95,
                 pool_embeddings: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None
                 ) -> np.ndarray:
    """A mask over ``df``'s rows (columns ``sha256``, ``phash``): the rows that copy an evaluation
    image. ``embeddings``: a .npy of the evaluation images' embeddings, matched against
    ``pool_embeddings()``, which yields (rows, unit embeddings) shard by shard."""
    hit = np.zeros(df.height, dtype=bool)
    if not sources and not embeddings:
        return hit
    shas, hashes = load_eval_hashes(sources)
    if sources:
        hit |= df["sha256"].is_in(list(shas)).fill_null(False).to_numpy()
    if phash_radius is not None and len(hashes):
        ph = df["phash"].to_numpy()
        valid = np.flatnonzero(~df["phash"].is_null().to_numpy())
        pairs = near_pairs(ph[valid], phash_radius, other=np.array(hashes, dtype=np.int64))
        if len(pairs):
            hit[valid[pairs[:, 0]]] = True
    if embeddings and pool_embeddings is not None:
        import faiss

        ref = np.load(embeddings).astype(np.float32)
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(ref.shape[1])
        index.add(ref)
        for rows, emb in pool_embeddings():
            if len(rows):
                sim, _ = index.search(emb, 1)
                hit[rows[sim[:, 0] >= min_cosine]] = True
    return hit
