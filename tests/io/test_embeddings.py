"""Embedding columns and the raw float16 files SemDeDup streams its clusters through."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.io.embeddings import fixed_list, kept_rows, read_f16_rows, unit, unit_rows


def test_f16_file_round_trips_across_chunk_edges(tmp_path: Path):
    x = np.random.default_rng(0).normal(size=(1001, 24)).astype(np.float16)
    path = tmp_path / "c.f16"
    path.write_bytes(x[:600].tobytes())
    with open(path, "ab") as f:  # appended per shard, as the stage writes them
        f.write(x[600:].tobytes())
    got = read_f16_rows(path, 24, rows_per_chunk=128)
    assert got.dtype == np.float32 and got.shape == (1001, 24)
    assert np.array_equal(got, x.astype(np.float32))
    assert read_f16_rows(_empty(tmp_path), 24).shape == (0, 24)


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.f16"
    p.write_bytes(b"")
    return p


def test_unit_gives_a_row_the_same_values_in_any_batch():
    x = np.random.default_rng(1).normal(size=(500, 256)).astype(np.float16).astype(np.float32)
    whole = unit(x.copy(), rows_per_chunk=64)
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-6)
    order = np.random.default_rng(2).permutation(500)
    shuffled = unit(x[order].copy())
    assert np.array_equal(shuffled, whole[order])
    assert np.array_equal(unit(x[7:9].copy()), whole[7:9])
    zero = unit(np.zeros((2, 4), dtype=np.float32))  # a zero vector stays zero, no NaN
    assert not np.isnan(zero).any()


def test_kept_rows_skips_null_and_unkept_rows():
    vecs = [np.full(4, 0.5, np.float16), None, np.full(4, 2.0, np.float16), np.full(4, 1.0, np.float16)]
    table = pa.table({"uid": ["a", "b", "c", "d"], "image_emb": fixed_list(vecs, 4)})
    uids, stored = kept_rows(table, "image_emb", {"a", "b", "c"})
    assert uids == ["a", "c"] and stored.tolist() == [[0.5] * 4, [2.0] * 4]
    uids, normed = unit_rows(table, "image_emb", {"a", "b", "c"})
    assert uids == ["a", "c"] and np.allclose(normed, 0.5)


def test_embeddings_are_written_plain_and_the_other_columns_with_a_dictionary(tmp_path: Path):
    from curate.io.parquet import read_table, write_table

    vecs = [np.full(8, i % 3, np.float16) for i in range(500)]
    table = pa.table({"uid": [f"u{i % 7}" for i in range(500)], "image_emb": fixed_list(vecs, 8),
                      "crops": [[i % 5, 1] for i in range(500)], "meta": [{"k": i % 2} for i in range(500)],
                      "scores": pa.array([[0.5, 0.25]] * 500, type=pa.list_(pa.float32(), 2))})
    path = tmp_path / "t.parquet"
    write_table(table, path)
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {md.column(i).path_in_schema: md.column(i).encodings for i in range(md.num_columns)}
    assert set(encodings) == {"uid", "image_emb.list.element", "crops.list.element", "meta.k", "scores.list.element"}
    for leaf in ("uid", "crops.list.element", "meta.k"):
        assert "RLE_DICTIONARY" in encodings[leaf], leaf
    for leaf in ("image_emb.list.element", "scores.list.element"):
        assert "RLE_DICTIONARY" not in encodings[leaf], leaf
    assert read_table(path).equals(table)
