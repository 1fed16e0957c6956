"""Atomic Parquet writes: a reader never sees a half-written file, a crash never leaves one.

Paths may be local or URLs (a work dir on object storage): a URL is written from a local temp
file with one upload (an S3 PUT is atomic per object; a failed multipart upload is aborted), and
read through fsspec.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.errors import RefusedOutput, WorkDirError  # noqa: F401  (importers take them from here)
from curate.io import storage
from curate.io.storage import WorkPath

META_KEY = b"curate"



def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | WorkPath) -> Iterator[str]:
    """A temp name beside ``path`` to write to; on success it is fsynced and renamed onto ``path``.

    All or nothing: on any error the temp file is removed and OSErrors become WorkDirError
    naming the path (full disk, read-only or blocked work dir).
    """
    if storage.is_url(path):
        with _upload_on_success(str(path)) as tmp:
            yield tmp
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise WorkDirError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quiet(tmp)
        raise WorkDirError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(path.parent)


@contextmanager
def _upload_on_success(url: str) -> Iterator[str]:
    fd, tmp = tempfile.mkstemp(prefix=".curate-upload-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        fs, key = storage.filesystem(url)
        fs.put_file(tmp, key)
    except OSError as e:
        raise WorkDirError(f"cannot write {url}: {e.strerror or e}") from e
    finally:
        _unlink_quiet(tmp)


def atomic_write_bytes(path: str | WorkPath, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _unlink_quiet(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_table(table: pa.Table, path: str | WorkPath, meta: dict[str, Any] | None = None,
                row_group_size: int | None = None) -> None:
    """Write ``table`` atomically, with ``meta`` (JSON) in the Parquet key-value metadata."""
    if meta is not None:
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta, sort_keys=True).encode()
        table = table.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size,
                       use_dictionary=dictionary_columns(table.schema))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet columns (leaf paths) to dictionary-encode: all but the values of fixed-size
    float lists (embeddings). Their values rarely repeat, so the writer gives the dictionary up
    after the first page, and that mixed encoding reads back several times slower than plain
    values (figures on the performance page)."""
    def leaves(name: str, t: pa.DataType, in_float_vector: bool = False) -> list[tuple[str, bool]]:
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            vector = in_float_vector or (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type))
            return leaves(f"{name}.list.element", t.value_type, vector)
        if pa.types.is_struct(t):
            return [leaf for i in range(t.num_fields)
                    for leaf in leaves(f"{name}.{t.field(i).name}", t.field(i).type, in_float_vector)]
        return [(name, in_float_vector)]

    return [path for f in schema for path, vector in leaves(f.name, f.type) if not vector]


def read_meta(path: str | WorkPath) -> dict[str, Any] | None:
    """The curate metadata of a Parquet file, or None when missing or unreadable."""
    try:
        schema = read_schema(path)
    except (OSError, pa.ArrowInvalid, ValueError):
        return None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


_TAIL = 64 * 1024


def _footer(url: str) -> pa.BufferReader:
    """A Parquet object's footer alone, as a buffer pyarrow reads the schema and row counts from:
    one ranged request for the last 64 KiB (a second only for a larger footer), never the object."""
    fs, key = storage.filesystem(url)
    tail = fs.cat_file(key, start=-_TAIL)
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise pa.ArrowInvalid(f"{url}: not a Parquet file")
    need = int.from_bytes(tail[-8:-4], "little") + 8
    if need > len(tail):
        tail = fs.cat_file(key, start=-need)
    return pa.BufferReader(b"PAR1" + tail[-need:])  # the footer parses on its own behind the magic


def read_schema(path) -> pa.Schema:
    return pq.read_schema(_footer(str(path)) if storage.is_url(path) else str(path))


def column_names(path) -> list[str]:
    return read_schema(path).names


def num_rows(path) -> int:
    return pq.read_metadata(_footer(str(path)) if storage.is_url(path) else str(path)).num_rows


def parquet_file(source, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (a path, a file object or a buffer) read through ``ParquetFile``:
    ``pq.read_table`` goes through pyarrow.dataset, whose import alone (it pulls in pandas) costs
    every process a quarter of a second."""
    return pq.ParquetFile(source).read(columns=columns)


def read_table(path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file; on object storage fetched whole with one request (work-dir tables are a
    shard's rows, small enough; pyarrow reading through fsspec makes several requests a file)."""
    if storage.is_url(path):
        fs, key = storage.filesystem(str(path))
        return parquet_file(pa.BufferReader(fs.cat_file(key)), columns=columns)
    return parquet_file(str(path), columns=columns)


def read_frame(path, columns: list[str] | None = None) -> pl.DataFrame:
    """One Parquet file, every file a glob matches, or a list of files, as one polars frame;
    files without some of the columns get nulls there (stats files of older versions)."""
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    if not any(storage.is_url(p) for p in paths):
        return pl.read_parquet(paths if isinstance(path, (list, tuple)) else paths[0], columns=columns,
                               missing_columns="insert")
    fs, _ = storage.filesystem(paths[0])
    files = []
    for p in paths:
        key = storage.filesystem(p)[1]
        files += sorted(fs.glob(key)) if any(c in key for c in "*?[") else [key]
    if not files:
        raise FileNotFoundError(f"no Parquet files match {path}")
    blobs = fs.cat(files, on_error="raise") if len(files) > 1 else {files[0]: fs.cat_file(files[0])}
    tables = [parquet_file(pa.BufferReader(blobs[f]), columns=columns) for f in files]
    return pl.from_arrow(pa.concat_tables(tables, promote_options="default"))


def read_tables_if_present(paths: list) -> list[pa.Table | None]:
    """Each Parquet file of ``paths``, or None where it does not exist; on object storage the
    objects are fetched concurrently."""
    if not paths or not storage.is_url(paths[0]):
        return [parquet_file(str(p)) if os.path.exists(str(p)) else None for p in paths]
    fs, _ = storage.filesystem(str(paths[0]))
    keys = [storage.filesystem(str(p))[1] for p in paths]
    blobs = fs.cat(keys, on_error="return")
    out: list[pa.Table | None] = []
    for k in keys:
        b = blobs.get(k)
        if isinstance(b, FileNotFoundError) or b is None:
            out.append(None)
        elif isinstance(b, Exception):
            raise b
        else:
            out.append(parquet_file(pa.BufferReader(b)))
    return out
