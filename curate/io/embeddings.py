"""Embedding columns: float16 fixed-size lists in Parquet, float32 arrays in memory."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa


def f16_to_f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch, whose conversion is vectorised (F16C); numpy's astype is not."""
    try:
        import torch
    except ImportError:  # torch is a dependency, but this path needs nothing else of it
        return a.astype(np.float32)
    with warnings.catch_warnings():  # read-only Arrow buffers: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


def fixed_list(vecs: list, d: int) -> pa.FixedSizeListArray:
    """float16 fixed-size list column of ``d``-vectors, null where a row has None."""
    n = len(vecs)
    flat = np.zeros((n, d), dtype=np.float16)
    mask = np.ones(n, dtype=bool)
    for i, v in enumerate(vecs):
        if v is not None:
            flat[i] = v
            mask[i] = False
    values = pa.array(flat.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, d, mask=pa.array(mask))


def embeddings(table: pa.Table, column: str) -> np.ndarray:
    """(rows, d) float32 array from a fixed-size list column (null rows become NaN)."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    if col.null_count == 0:  # the common case: one conversion, no mask
        return f16_to_f32(col.values.to_numpy(zero_copy_only=False)).reshape(-1, d)
    flat = f16_to_f32(col.flatten().to_numpy(zero_copy_only=False))
    out = np.full((len(col), d), np.nan, dtype=np.float32)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    out[valid] = flat.reshape(-1, d) if flat.size else flat.reshape(0, d)
    return out


def kept_rows(table: pa.Table, column: str, keep: set[str] | dict) -> tuple[list[str], np.ndarray]:
    """(uids, float32 embeddings as stored) of the rows of ``table`` (with a uid column) whose uid
    is in ``keep`` and whose embedding is not null."""
    emb = embeddings(table, column)
    uids = table.column("uid").to_pylist()
    present = (~np.isnan(emb[:, 0])).tolist()
    rows = [i for i, (u, has) in enumerate(zip(uids, present)) if has and u in keep]
    return [uids[i] for i in rows], emb[rows]


def unit(e: np.ndarray, rows_per_chunk: int = 8192) -> np.ndarray:
    """Rows scaled to unit L2 length, in place, a chunk at a time (the norm's temporaries stay
    small). Each row is scaled on its own, so it gets the same values whichever rows it is batched
    with."""
    for s in range(0, len(e), rows_per_chunk):
        c = e[s:s + rows_per_chunk]
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(e)


def read_f16_rows(path: str | Path, d: int, rows_per_chunk: int = 65536) -> np.ndarray:
    """(rows, d) float32 array from a raw file of float16 ``d``-vectors, read and converted a chunk
    at a time (no float16 copy of the whole file in memory)."""
    with open(path, "rb") as f:
        out = np.empty((os.fstat(f.fileno()).st_size // (2 * d), d), dtype=np.float32)
        for s in range(0, len(out), rows_per_chunk):
            chunk = np.fromfile(f, dtype=np.float16, count=rows_per_chunk * d).reshape(-1, d)
            out[s:s + len(chunk)] = f16_to_f32(chunk)
    return out


def unit_rows(table: pa.Table, column: str, keep: set[str] | dict) -> tuple[list[str], np.ndarray]:
    """(uids, L2-normalised float32 embeddings) of ``kept_rows``."""
    uids, e = kept_rows(table, column, keep)
    return uids, unit(e)
