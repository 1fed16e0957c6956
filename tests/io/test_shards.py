from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from curate.io.shards import InputError, ShardReadResult, expand_input, iter_samples, make_uid
from tests.conftest import jpeg_bytes, write_tar


def test_expand_path_glob_brace_and_list(pool: Path, tmp_path: Path):
    all4 = expand_input(str(pool / "*.tar"))
    assert [Path(p).name for p in all4] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert expand_input(str(pool / "{00001..00002}.tar")) == all4[1:3]
    assert expand_input(str(pool / "00003.tar")) == all4[3:]
    lst = tmp_path / "shards.txt"
    lst.write_text(f"# a comment\n{pool}/00000.tar\n\n{pool}/00002.tar\n")
    assert expand_input(str(lst)) == [all4[0], all4[2]]
    assert expand_input(str(pool)) == all4


def test_missing_input_names_the_path(tmp_path: Path):
    with pytest.raises(InputError, match="nope.tar"):
        expand_input(str(tmp_path / "nope.tar"))
    with pytest.raises(InputError, match="matches no shard"):
        expand_input(str(tmp_path / "*.tar"))


def test_groups_members_by_key_and_reads_all_kinds(tmp_path: Path):
    p = write_tar(tmp_path / "a.tar", [
        ("0001.jpg", jpeg_bytes()), ("0001.txt", b"a red square"), ("0001.json", b'{"url": "u"}'),
        ("0002.png", b"png"), ("0002.caption", b"cap"),
        ("dir/0003.webp", b"w"), ("dir/0003.txt", b"t"),
    ])
    samples = list(iter_samples(p))
    assert [s.key for s in samples] == ["0001", "0002", "dir/0003"]
    assert samples[0].image_ext() == "jpg" and samples[0].caption_bytes() == b"a red square"
    assert samples[1].image_ext() == "png" and samples[1].caption_bytes() == b"cap"
    assert samples[2].image_ext() == "webp"


def test_truncated_tar_yields_prefix_and_reports(pool: Path, tmp_path: Path):
    data = (pool / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    res = ShardReadResult()
    samples = list(iter_samples(cut, res))
    assert res.error and "truncated" in res.error
    assert 10 < len(samples) < 100
    assert "shard:truncated" in samples[-1].problems
    assert all(not s.problems for s in samples[:-1])


def test_unsafe_names_links_and_empty_shard(tmp_path: Path):
    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as tf:
        for name, data in [("../escape.jpg", b"x"), ("/abs/0001.txt", b"y")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("0002.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    samples = list(iter_samples(p))
    problems = [pr for s in samples for pr in s.problems]
    assert problems.count("member:unsafe_name") == 2
    assert "member:not_a_file" in problems
    assert all(not s.members for s in samples)
    assert not (tmp_path.parent / "escape.jpg").exists()
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    res = ShardReadResult()
    assert list(iter_samples(empty, res)) == [] and res.error is None


def test_not_a_tar_is_reported(tmp_path: Path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"this is not a tar at all" * 100)
    res = ShardReadResult()
    assert list(iter_samples(p, res)) == []
    assert res.error


def test_uid_rule():
    assert make_uid("s", "k") == make_uid("s", "k")
    assert make_uid("s", "k") != make_uid("s2", "k")
    assert len(make_uid("s", "k")) == 32
    int(make_uid("s", "k"), 16)
