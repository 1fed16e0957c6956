"""Embedding columns: float16 fixed-size lists in Parquet, float32 arrays in memory."""
from __future__ import annotations

import warnings

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


def unit_rows(table: pa.Table, column: str, keep: set[str] | dict) -> tuple[list[str], np.ndarray]:
    """(uids, L2-normalised float32 embeddings) of the rows of ``table`` (with a uid column) whose
    uid is in ``keep`` and whose embedding is not null."""
    emb = embeddings(table, column)
    uids = table.column("uid").to_pylist()
    rows = [i for i, u in enumerate(uids) if u in keep and not np.isnan(emb[i, 0])]
    e = emb[rows]
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return [uids[i] for i in rows], np.ascontiguousarray(e)
