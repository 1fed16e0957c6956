"""List input shards and stream WebDataset tars sample by sample, never unpacking to disk.

Layout read: img2dataset / DataComp tars, members ``KEY.ext`` grouped by KEY (webdataset's rule:
the key is the path up to the first dot of the file name). Images: jpg, jpeg, png, webp (also
bmp, gif, tif); captions: txt, caption; metadata: json.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from braceexpand import braceexpand

from curate.io.tar_members import iter_members

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption")
JSON_EXT = "json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# A metadata shard (DataComp's pool metadata: uid, url, text, original sizes, scores; or a URL
# list as img2dataset reads it: url + caption in Parquet, CSV or TSV) has no images.
METADATA_SUFFIXES = (".parquet", ".csv", ".tsv")
SHARD_SUFFIXES = TAR_SUFFIXES + METADATA_SUFFIXES


def folder_shards(names: list[str]) -> list[str]:
    """The shards of a folder listing: its tars; only a folder without tars is a metadata pool
    (img2dataset writes a .parquet beside each .tar, and a synthetic pool its ground truth)."""
    tars = [n for n in names if n.endswith(TAR_SUFFIXES)]
    return tars or [n for n in names if n.endswith(METADATA_SUFFIXES)]


def is_metadata_shard(path: str | Path) -> bool:
    return str(path).endswith(METADATA_SUFFIXES)
# A single member larger than this is not read into memory: it becomes a row-level reason.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
_UID_RE = re.compile(r"^[0-9a-f]{32}$")
# webdataset's key/extension split (tariterators.base_plus_ext), kept here to avoid depending
# on a private helper whose signature changed between releases.
SAMPLE_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class InputError(ValueError):
    """The input spec names nothing readable."""


def shard_name(path: str | Path) -> str:
    """Stable shard id used for output file names: the file name without tar suffixes."""
    name = Path(str(path)).name
    for suf in SHARD_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _expand_url(spec: str) -> list[str]:
    """A URL: a list file, or braces then globs, a folder, or one shard (checked to exist)."""
    from curate.io import storage

    if spec.endswith((".txt", ".list")) and storage.is_file(spec):
        lines = [ln.strip() for ln in storage.read_text(spec).splitlines() if ln.strip() and not ln.startswith("#")]
        return expand_input([storage.join_relative(spec, ln) for ln in lines])
    out: list[str] = []
    for pat in braceexpand(spec):
        if any(ch in pat for ch in "*?["):
            out.extend(storage.glob(pat))
        elif storage.is_dir(pat):
            out.extend(folder_shards(storage.listdir(pat)))
        elif storage.is_file(pat):
            out.append(pat)
        else:
            raise InputError(f"input shard(s) not found: {pat}")
    return out


@dataclass(frozen=True)
class Shard:
    """One input shard, built once from the input spec and carried through a run as a value: its
    name (the output files' name, ``shard_name``), where it lies (a path or URL) and its size in
    bytes (None for a URL: listing a bucket does not stat every object)."""

    name: str
    path: str
    size: int | None = None

    @classmethod
    def at(cls, path: str) -> "Shard":
        from curate.io import storage

        return cls(shard_name(path), path, None if storage.is_url(path) else os.path.getsize(path))

    def __str__(self) -> str:
        return self.path


def list_shards(spec: str | list[str]) -> list[Shard]:
    """The input's shards in run order (``expand_input``), each a ``Shard``."""
    return [Shard.at(p) for p in expand_input(spec)]


def expand_input(spec: str | list[str], base: Path | None = None) -> list[str]:
    """Resolve a path or URL, glob, brace pattern, list file (``.txt``/``.list``) or list of those.

    Returns absolute paths (URLs as given), sorted and de-duplicated, so every run sees the shards
    in one order.
    """
    from curate.io import storage

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    urls: list[str] = []
    for s in specs:
        if storage.is_url(str(s)):
            urls.extend(_expand_url(str(s)))
            continue
        s = os.path.expanduser(str(s))
        if base is not None and not os.path.isabs(s):
            s = str(base / s)
        if s.endswith((".txt", ".list")) and os.path.isfile(s):
            with open(s) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            found = expand_input(lines, base=Path(s).parent)
            urls.extend(p for p in found if storage.is_url(p))
            out.extend(p for p in found if not storage.is_url(p))
            continue
        for pat in braceexpand(s):
            if any(ch in pat for ch in "*?["):
                out.extend(sorted(glob.glob(pat)))
            elif os.path.isdir(pat):
                out.extend(folder_shards([str(p) for p in sorted(Path(pat).iterdir())]))
            else:
                out.append(pat)
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"input shard(s) not found: {shown}")
    if not out and not urls:
        raise InputError(f"input {spec!r} matches no shard")
    paths = sorted({os.path.abspath(p) for p in out} | set(urls))
    names = [shard_name(p) for p in paths]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"two input shards share the name(s) {dup}; shard names must be unique")
    return paths


def make_uid(shard: str, key: str) -> str:
    """128-bit uid from (shard name, sample key), as hex: stable across runs and machines."""
    return hashlib.blake2b(f"{shard}/{key}".encode(), digest_size=16).hexdigest()


@dataclass
class RawSample:
    """One sample as read from a tar: member bytes by extension, plus what went wrong."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    def image(self) -> bytes | None:
        ext = self.image_ext()
        return self.members[ext] if ext else None

    def caption_bytes(self) -> bytes | None:
        return next((self.members[e] for e in CAPTION_EXTS if e in self.members), None)

    def meta(self) -> dict[str, Any]:
        raw = self.members.get(JSON_EXT)
        if not raw:
            return {}
        try:
            val = json.loads(raw)
        except (ValueError, RecursionError):
            self.problems.append("json:unparsable")
            return {}
        return val if isinstance(val, dict) else {}


@dataclass
class ShardReadResult:
    """Filled while reading: an error here means the shard was cut short (prefix was read)."""

    error: str | None = None
    n_members: int = 0
    n_bytes: int = 0


def _safe_member_name(name: str) -> bool:
    # String ops, not pathlib: this runs once per member on the hot path.
    return not name.startswith(("/", "\\")) and ".." not in name.replace("\\", "/").split("/")


def iter_samples(path: str | Path, result: ShardReadResult | None = None) -> Iterator[RawSample]:
    """Stream the samples of one tar in member order.

    Never raises for bad content: a truncated or corrupt tar ends the iteration and sets
    ``result.error``; bad members become ``problems`` on their sample.
    """
    for _, sample in iter_indexed_samples(path, result):
        yield sample


def iter_indexed_samples(path: str | Path, result: ShardReadResult | None = None,
                         want: Callable[[int], bool] | None = None) -> Iterator[tuple[int, RawSample]]:
    """(row, sample) in member order, row counting every sample of the shard. With ``want``,
    only the rows it accepts are read and yielded; the data of the others is skipped unread."""
    result = result if result is not None else ShardReadResult()
    current: RawSample | None = None
    row = -1
    from curate.io.storage import open_read

    try:
        f = open_read(str(path))
    except OSError as e:
        result.error = f"unreadable: {e.strerror or e}"
        return
    with f:
        try:
            members = iter_members(f)
            first = next(members, None)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            result.error = f"not a tar: {e}"
            return
        if first is None:
            return
        try:
            for name, is_file, size, read in itertools.chain([first], members):
                result.n_members += 1
                match = SAMPLE_KEY_RE.match(name)
                key, ext = (match.group(1), match.group(2).lower()) if match else (name, "")
                if current is None or key != current.key:
                    if current is not None and (want is None or want(row)):
                        yield row, current
                    current = RawSample(key=key)
                    row += 1
                if want is not None and not want(row):
                    continue
                if not _safe_member_name(name):
                    current.problems.append("member:unsafe_name")
                    continue
                if not is_file:
                    current.problems.append("member:not_a_file")
                    continue
                if size > MAX_MEMBER_BYTES:
                    current.problems.append(f"member:too_large:{ext}")
                    continue
                data = read()
                if len(data) != size:
                    raise EOFError(f"member {name} truncated")
                result.n_bytes += len(data)
                if ext in current.members:
                    current.problems.append(f"member:duplicate:{ext}")
                    continue
                current.members[ext] = data
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            result.error = f"truncated or corrupt tar after {result.n_members} members: {e}"
            log.warning("shard %s: %s", path, result.error)
            if current is not None:
                current.problems.append("shard:truncated")
        if current is not None and (want is None or want(row)):
            yield row, current


class SharedShard:
    """One read of a shard's tar shared by the map stages that run fused in one task: the first
    stage to ask reads the tar, the later ones get the samples it read (bytes read once; a read
    error is reported to every stage that reads). The samples stay in memory until ``release``."""

    def __init__(self, path: str):
        self.path = path
        self._samples: list[RawSample] | None = None
        self._result = ShardReadResult()

    def load(self, result: ShardReadResult) -> "SharedShard":
        """Read the tar unless read already; ``result`` gets the bytes (first reader only) and any
        read error."""
        if self._samples is None:
            self._samples = list(iter_samples(self.path, self._result))
            result.n_bytes += self._result.n_bytes
            result.n_members += self._result.n_members
        if self._result.error:
            result.error = self._result.error
        return self

    def indexed(self, result: ShardReadResult | None = None,
                want: Callable[[int], bool] | None = None) -> Iterator[tuple[int, RawSample]]:
        """As ``iter_indexed_samples(path, result, want)``, from the one read."""
        self.load(result if result is not None else ShardReadResult())
        for i, s in enumerate(self._samples or []):
            if want is None or want(i):
                yield i, s

    def release(self) -> None:
        self._samples = None


def sample_uid(sample: RawSample, meta: dict[str, Any], shard: str) -> str:
    """DESIGN.md uid rule: the sample's own 32-hex uid when its json has one, else hash(shard, key)."""
    uid = meta.get("uid")
    if isinstance(uid, str) and _UID_RE.match(uid.lower()):
        return uid.lower()
    return make_uid(shard, sample.key)
