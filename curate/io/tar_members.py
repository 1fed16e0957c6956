"""Members of a tar file: (name, is_file, size, read) in archive order.

Python's ``tarfile`` spends ~80 us per member building a TarInfo (pax and GNU handling, name
normalisation, sparse files...). A WebDataset shard is three small members per sample, so that
overhead, not I/O, bounds every stage that streams a shard (~4,000 samples/s on one core).

For an uncompressed tar we read the 512-byte headers ourselves: POSIX ustar with pax extended
headers ('x', 'g') and GNU long names ('L', 'K'), which is what img2dataset, webdataset and
GNU/BSD tar write. A member whose data is not wanted is skipped with a seek, so a reader that
wants a few rows of a shard pays for headers only. Anything we do not parse (a compressed shard,
a stream that cannot seek, a header we do not understand mid-way) goes through ``tarfile``, which stays the reference: the
tests check that both readers agree on every shard they read, damaged ones included.
"""
from __future__ import annotations

import os
import tarfile
from typing import BinaryIO, Callable, Iterator

from curate.io import storage

BLOCK = 512
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_FILE_TYPES = (b"0", b"\x00", b"7")  # regular, old-style regular, contiguous: tarfile's isfile()
_META_TYPES = (b"x", b"g", b"L", b"K")

Member = tuple[str, bool, int, Callable[[], bytes]]


class TarFormatError(tarfile.TarError):
    """A header that is not a valid tar header (bad checksum, bad number field)."""


def iter_members(f: BinaryIO) -> Iterator[Member]:
    """(name, is_file, size, read) for each member of the open tar ``f``. ``read()`` returns the
    member's data (at most ``size`` bytes: fewer means the file is truncated); not calling it
    skips the data. Raises TarError/EOFError/OSError on a damaged archive, after the members
    before the damage."""
    head = f.read(6)
    f.seek(0)
    # the header reader seeks (to skip unwanted data, and to learn the size): local files, object
    # storage files and in-memory buffers can; a pipe cannot
    if head.startswith(COMPRESSED_MAGIC) or not f.seekable():
        yield from _tarfile_members(f)
    else:
        yield from _plain_members(f)


def is_local_plain_tar(shard: object) -> bool:
    """Whether ``shard`` is an uncompressed tar on the local disk (what DALI's reader can read)."""
    if not isinstance(shard, str) or storage.is_url(shard):
        return False
    try:
        with open(shard, "rb") as f:
            return not f.read(6).startswith(COMPRESSED_MAGIC)
    except OSError:
        return False


def _tarfile_members(f: BinaryIO) -> Iterator[Member]:
    tf = tarfile.open(fileobj=f, mode="r|*")  # from the current position of f
    for m in tf:
        def read(m=m) -> bytes:
            fobj = tf.extractfile(m)
            return fobj.read() if fobj is not None else b""

        yield m.name, m.isfile(), m.size, read


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        n = int.from_bytes(field[1:], "big")
        return -n if field[0] & 0x40 else n
    s = field.split(b"\x00", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


_HIGH_BYTES = bytes(range(128, 256))


def _checksum_ok(hdr: bytes) -> bool:
    stored = _number(hdr[148:156])
    unsigned = sum(hdr[:148]) + 256 + sum(hdr[156:])  # the checksum field counts as 8 spaces
    if stored == unsigned:
        return True
    # Old tars summed the bytes as signed chars: each byte over 127 counts 256 less.
    high = hdr[:148] + hdr[156:]
    return stored == unsigned - 256 * (len(high) - len(high.translate(None, _HIGH_BYTES)))


def _pax_records(data: bytes) -> dict[str, bytes]:
    """'<len> <key>=<value>\\n' records (POSIX.1-2001)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise TarFormatError("bad pax record") from None
        if length <= 0:
            raise TarFormatError("bad pax record length")
        rec = data[sp + 1:pos + length - 1]
        key, _, value = rec.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


_KNOWN_TYPES = _FILE_TYPES + (b"1", b"2", b"3", b"4", b"5", b"6")


def _plain_members(f: BinaryIO) -> Iterator[Member]:
    file_size = f.seek(0, os.SEEK_END)  # no request on object storage: fsspec knows the size
    pos = entry = 0  # entry: where the current member's first header (maybe a pax one) starts
    long_name: bytes | None = None
    pax: dict[str, bytes] = {}
    while True:
        f.seek(pos)
        hdr = f.read(BLOCK)
        if len(hdr) < BLOCK and (hdr or pos != entry):
            raise EOFError("truncated tar header")
        if not hdr or hdr == b"\x00" * BLOCK:
            if pos != entry:  # an extended header announces a member that is not there
                raise TarFormatError("end of archive after an extended header")
            return  # a missing end marker at a block boundary is accepted, as tarfile does
        if not _checksum_ok(hdr):
            raise TarFormatError(f"bad header checksum at byte {pos}")
        size = _number(hdr[124:136])
        kind = hdr[156:157]
        data_at = pos + BLOCK
        if kind in _META_TYPES:
            if size < 0:
                raise TarFormatError(f"negative extended header size at byte {pos}")
            f.seek(data_at)
            body = f.read(size)
            if len(body) < size:
                raise EOFError("truncated tar extended header")
            if kind == b"L":
                long_name = body.split(b"\x00", 1)[0]
            elif kind == b"x":
                pax = _pax_records(body)
            pos = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
            continue
        if kind not in _KNOWN_TYPES:  # GNU sparse and other rarities: tarfile reads the rest
            f.seek(entry)
            yield from _tarfile_members(f)
            return
        name = hdr[:100].split(b"\x00", 1)[0]
        if hdr[257:263] == b"ustar\x00":  # POSIX: a prefix field holds the leading directories
            prefix = hdr[345:500].split(b"\x00", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarFormatError("bad pax size") from None
        long_name, pax = None, {}
        if size < 0:  # a negative size would walk backwards through the file: never ends
            raise TarFormatError(f"negative member size at byte {pos}")
        text = name.decode("utf-8", "surrogateescape")
        if kind == b"\x00" and text.endswith("/"):
            kind = b"5"  # old-style directory, as tarfile reads it
        is_file = kind in _FILE_TYPES
        if kind == b"5":
            text = text.rstrip("/")
        if not is_file:
            size = 0  # links, directories and devices carry no data (tarfile ignores the field)

        def read(at=data_at, n=size) -> bytes:
            f.seek(at)
            return f.read(n)

        yield text, is_file, size, read
        if data_at + size > file_size:
            raise EOFError(f"member {text} truncated")
        pos = entry = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
