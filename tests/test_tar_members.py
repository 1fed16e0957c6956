"""Our header reader against tarfile, the reference, on well-formed and damaged tars."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from curate.io.shards import iter_indexed_samples, iter_samples
from curate.io.tar_members import _plain_members, _tarfile_members

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shards"


def _read_all(reader, path: Path) -> tuple[list, str | None]:
    out, err = [], None
    with open(path, "rb") as f:
        try:
            for name, is_file, size, read in reader(f):
                out.append((name, is_file, size, read() if is_file else b""))
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            err = type(e).__name__
    return out, err


def _assert_agree(path: Path) -> None:
    ours, our_err = _read_all(_plain_members, path)
    ref, ref_err = _read_all(_tarfile_members, path)
    if ref_err is None and our_err is None:
        assert ours == ref
        return
    # damaged: the same members up to the damage; we never read past what tarfile read, and
    # where tarfile complained we complain too (tarfile stops silently at some bad headers;
    # we report those, so a damaged shard is never taken for a complete one)
    n = min(len(ours), len(ref))
    assert ours[:n] == ref[:n]
    if ref_err is not None:
        assert our_err is not None
    assert len(ours) <= len(ref) + 1


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    return ti, None


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_formats_names_and_member_types_agree(tmp_path: Path, fmt):
    long_dir = "d" * 120 + "/sub"
    members = [_file("000.jpg", b"\xff\xd8" + b"x" * 1000), _file("000.txt", b"caption"),
               _file(f"{long_dir}/001.jpg", b"y" * 512), _file(f"{long_dir}/001.txt", b""),
               _special("dir/", tarfile.DIRTYPE), _special("002.lnk", tarfile.SYMTYPE, "/etc/passwd"),
               _special("003.hard", tarfile.LNKTYPE, "000.jpg"), _special("004.dev", tarfile.CHRTYPE),
               _file("../005.txt", b"escape"), _file("/abs/006.txt", b"abs")]
    if fmt != tarfile.USTAR_FORMAT:
        members += [_file("名前/007.txt", "ünïcode".encode()), _file("x" * 150 + ".json", b"{}")]
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if len(m[0].name) <= 100 or m[0].name.startswith("d")]
    _assert_agree(_tar(tmp_path / "a.tar", members, fmt))


def test_pool_and_coco_shards_agree(pool: Path):
    for p in sorted(pool.glob("*.tar"))[:2]:
        _assert_agree(p)
    coco = SHARED / "coco-val2017-mini-000000.tar"
    if coco.exists():
        _assert_agree(coco)


def test_damaged_tars_agree(pool: Path, tmp_path: Path):
    src = (pool / "00000.tar").read_bytes()[: 512 * 400]
    rng = random.Random(7)
    cases = {"cut_mid_data": src[: 512 * 101 + 77], "cut_mid_header": src[: 512 * 3 + 100],
             "zeros_after_header": src[:512] + b"\x00" * 2048}
    for k in range(12):
        b = bytearray(src)
        for _ in range(8):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases[f"flips{k}"] = bytes(b)
    for name, data in cases.items():
        p = tmp_path / f"{name}.tar"
        p.write_bytes(data)
        _assert_agree(p)


def test_compressed_shard_goes_through_tarfile(tmp_path: Path):
    p = tmp_path / "a.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        for name, data in (("000.txt", b"one"), ("000.jpg", b"img"), ("001.txt", b"two")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    assert [(s.key, s.members) for s in iter_samples(p)] == [
        ("000", {"txt": b"one", "jpg": b"img"}), ("001", {"txt": b"two"})]


def test_wanted_rows_skip_the_others_unread(pool: Path):
    shard = pool / "00001.tar"
    full = list(iter_indexed_samples(shard))
    assert [r for r, _ in full] == list(range(len(full)))
    some = list(iter_indexed_samples(shard, want=lambda r: r % 3 == 1))
    assert [(r, s.members) for r, s in some] == [(r, s.members) for r, s in full if r % 3 == 1]


def test_negative_size_is_an_error_not_a_loop(tmp_path: Path):
    ti, data = _file("000.txt", b"abc")
    p = _tar(tmp_path / "neg.tar", [_file("000.jpg", b"x" * 600), (ti, data)], tarfile.GNU_FORMAT)
    raw = bytearray(p.read_bytes())
    hdr = 512 * 3  # second member's header: after the first header and its two data blocks
    assert raw[hdr:hdr + 7] == b"000.txt"
    raw[hdr + 124:hdr + 136] = b"\xff" + b"\xff" * 11  # base-256 minus one
    raw[hdr + 148:hdr + 156] = b" " * 8
    raw[hdr + 148:hdr + 155] = f"{sum(raw[hdr:hdr + 512]):06o}\0".encode()
    p.write_bytes(bytes(raw))
    ours, err = _read_all(_plain_members, p)
    assert err == "TarFormatError" and [m[0] for m in ours] == ["000.jpg"]
    res_samples = list(iter_samples(p))
    assert [s.key for s in res_samples] == ["000"] and "shard:truncated" in res_samples[0].problems


def test_in_memory_and_unseekable_tars_read_alike(tmp_path: Path):
    """A buffer (as an object-storage file) seeks: the header reader; a pipe cannot: tarfile."""
    from curate.io.tar_members import iter_members

    p = _tar(tmp_path / "m.tar", [_file("000.txt", b"one"), _file("000.jpg", b"x" * 700)])

    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

        def seek(self, *a):  # iter_members rewinds after sniffing the magic; a real pipe would buffer
            return super().seek(*a)

    want = [("000.txt", True, 3, b"one"), ("000.jpg", True, 700, b"x" * 700)]
    for f in (io.BytesIO(p.read_bytes()), Pipe(p.read_bytes())):
        assert [(n, k, s, r()) for n, k, s, r in iter_members(f)] == want


def test_signed_checksum_headers_are_read(tmp_path: Path):
    """Some old tar writers summed header bytes as signed chars; tarfile accepts both sums, so do we.
    A name byte over 127 makes the two sums differ by 256 per such byte."""
    name = "caf\u00e9.txt"  # UTF-8 \xc3\xa9: two bytes over 127
    p = _tar(tmp_path / "signed.tar", [_file(name, b"abc"), _file("000.jpg", b"x" * 10)], tarfile.GNU_FORMAT)
    raw = bytearray(p.read_bytes())
    assert raw[:5] == "caf\u00e9".encode()
    raw[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in raw[:512])
    raw[148:155] = f"{signed:06o}\0".encode()
    p.write_bytes(bytes(raw))
    _assert_agree(p)
    ours, err = _read_all(_plain_members, p)
    assert err is None and [m[0] for m in ours] == [name, "000.jpg"]
    raw[148:155] = f"{signed + 1:06o}\0".encode()  # neither sum: a damaged header
    p.write_bytes(bytes(raw))
    assert _read_all(_plain_members, p)[1] == "TarFormatError"
