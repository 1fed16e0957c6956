"""Where input shards live: local paths, or any fsspec URL (``s3://``, ``gs://``, ``hf://``,
``https://``). Listing, globbing and opening go through fsspec (s3fs, gcsfs); a tar is streamed
with large sequential reads (a read-ahead buffer), never a round trip per member.

Options per protocol (an S3 endpoint, a profile, anonymous access) come from the run config's
``storage_options``; credentials are best left to the usual environment variables and profiles.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import fsspec

if TYPE_CHECKING:
    from upath import UPath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_OPTIONS: dict[str, dict[str, Any]] = {}
# Read-ahead per request: large enough that a shard of small members costs few requests.
READ_BLOCK = 16 * 1024 * 1024
# Local buffer: a member's headers and data usually come from one read, and seeks within it are free.
READ_BUFFER = 1024 * 1024
_SECRET = re.compile(r"key|secret|token|password|credential|passwd", re.I)


def is_url(path: "str | Path | UPath") -> bool:
    return bool(_URL.match(str(path))) and not str(path).startswith("file://")


# A path inside a work dir: a local Path, or a UPath (pathlib's API over fsspec) for a URL.
WorkPath = Union[Path, "UPath"]


def work_path(path: "str | Path | UPath") -> WorkPath:
    """``path`` as a work-dir path: a resolved local Path, or a UPath on the URL's filesystem
    with this process's storage options (so ``/``, ``exists``, ``read_text``, ``glob`` work alike)."""
    if not is_url(path):
        return Path(path).resolve()
    from upath import UPath

    url = str(path).rstrip("/")
    filesystem(url)  # an option the filesystem does not take is named here, not at the first write
    return UPath(url, **_OPTIONS.get(url.split("://", 1)[0], {}))


def exclusive_create(path: WorkPath, data: bytes) -> None:
    """Create ``path`` holding ``data``, or raise FileExistsError when it exists (an O_EXCL
    create locally; a conditional PUT, If-None-Match, on object storage)."""
    if not is_url(path):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    fs, p = filesystem(str(path))
    with fs.open(p, "xb") as f:
        f.write(data)


def set_storage_options(options: dict[str, dict[str, Any]] | None) -> None:
    """Options for each protocol (``{"s3": {"endpoint_url": ...}}``), for this process."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def storage_options() -> dict[str, dict[str, Any]]:
    return dict(_OPTIONS)


def redacted(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every credential-like value replaced: what may be saved or logged."""
    return {k: redacted(v) if isinstance(v, dict) else "***" if _SECRET.search(k) else v
            for k, v in options.items()}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` (with this process's options) and the path inside it."""
    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url, **_OPTIONS.get(protocol, {}))
        if protocol in ("s3", "s3a"):  # s3fs makes its client lazily: its options are checked here
            fs.connect()
    except TypeError as e:  # an option the filesystem does not take: the user's config
        from curate.core.errors import ConfigError

        raise ConfigError(f"storage_options.{protocol}: {e}") from None
    except ImportError as e:  # the protocol's package is an extra (gcsfs) or not a dependency
        from curate.core.errors import ConfigError

        gcs = " It is the gcs extra: pip install 'curate[gcs]' (make install installs it)."
        raise ConfigError(f"{protocol}:// cannot be read here ({str(e).rstrip('.')}).{gcs if protocol in ('gs', 'gcs') else ''}"
                          ) from None
    return fs, path


def open_read(path: str) -> BinaryIO:
    """A file object for sequential reading (a local file, or a URL with a read-ahead buffer)."""
    if not is_url(path):
        return open(path, "rb", buffering=READ_BUFFER)
    fs, p = filesystem(path)
    return fs.open(p, "rb", block_size=READ_BLOCK, cache_type="readahead")


def is_file(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isfile(p)


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def size(path: str) -> int | None:
    """Bytes of a file (None when it cannot be found)."""
    try:
        fs, p = filesystem(path)
        return int(fs.size(p))
    except (OSError, ValueError):
        return None


def glob(pattern: str) -> list[str]:
    """URLs matching a glob pattern, sorted."""
    fs, p = filesystem(pattern)
    return sorted(fs.unstrip_protocol(m) for m in fs.glob(p))


def listdir(path: str) -> list[str]:
    fs, p = filesystem(path)
    return sorted(fs.unstrip_protocol(m) for m in fs.ls(p, detail=False))


def read_text(path: str) -> str:
    fs, p = filesystem(path)
    with fs.open(p, "r") as f:
        return f.read()


def call_with_options(options: dict[str, dict[str, Any]], fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a process that first takes these storage options (engine tasks
    run in worker processes that did not read the run config)."""
    set_storage_options(options)
    return fn(*args, **kwargs)


def join_relative(url: str, entry: str) -> str:
    """An entry of a list file at ``url``: itself when absolute (a URL or /path), else resolved
    against the list file's folder (``../pool/x.tar`` works)."""
    import posixpath

    if is_url(entry) or entry.startswith("/"):
        return entry
    protocol, rest = url.split("://", 1)
    return f"{protocol}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), entry))}"
