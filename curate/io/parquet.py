"""Atomic Parquet writes: a reader never sees a half-written file, a crash never leaves one."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"curate"


class WorkDirError(OSError):
    """The work dir (or a file in it) cannot be written: full disk, read-only, permissions."""


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
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temp name beside ``path`` to write to; on success it is fsynced and renamed onto ``path``.

    All or nothing: on any error the temp file is removed and OSErrors become WorkDirError
    naming the path (full disk, read-only or blocked work dir).
    """
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _unlink_quiet(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_table(table: pa.Table, path: str | Path, meta: dict[str, Any] | None = None,
                row_group_size: int | None = None) -> None:
    """Write ``table`` atomically, with ``meta`` (JSON) in the Parquet key-value metadata."""
    if meta is not None:
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta, sort_keys=True).encode()
        table = table.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The curate metadata of a Parquet file, or None when missing or unreadable."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid):
        return None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)
