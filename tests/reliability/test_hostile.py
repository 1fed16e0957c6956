"""Fuzzed shards and hostile members: no crash, no hang, nothing escapes the work dir, every
sample processed or carrying a reason."""
from __future__ import annotations

import pytest

import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from curate.io.shards import iter_samples
from curate.runner.pipeline import run_pipeline
from tests.conftest import jpeg_bytes, make_config, make_pipeline, shared_data

PIPE = make_pipeline(("text", {"all_rows": True}), ("image", {"all_rows": True, "max_dominant_share": 0.97}))


def _check_work(work: Path, shard: str) -> int:
    idx = pl.read_parquet(work / "index" / f"{shard}.parquet")
    for stage in ("text", "image"):
        t = pl.read_parquet(work / stage / f"{shard}.parquet")
        assert t["uid"].to_list() == idx["uid"].to_list()
        ev = t.filter(pl.col(f"keep_{stage}").is_not_null())
        assert ev.height == idx.height  # all_rows: every row judged
        assert ev.filter(~pl.col(f"keep_{stage}") & pl.col(f"reason_{stage}").is_null()).height == 0
    return idx.height


def test_fuzzed_real_shards(tmp_path: Path, record):
    src = shared_data("shards/coco-val2017-mini-000000.tar").read_bytes()[:3_000_000]
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(6):
        data = bytearray(src)
        if k % 2 == 0:
            for pos in rng.integers(0, len(data), size=200):  # byte flips anywhere (headers included)
                data[pos] ^= int(rng.integers(1, 256))
        if k >= 2:
            data = data[: int(rng.integers(len(data) // 4, len(data)))]  # truncation
        (inputs / f"fuzz{k}.tar").write_bytes(bytes(data))
    t0 = time.perf_counter()
    s = run_pipeline(PIPE, make_config(str(inputs / "*.tar"), tmp_path / "w"))
    elapsed = time.perf_counter() - t0
    rows = 0
    for k in range(6):
        p = tmp_path / "w" / "index" / f"fuzz{k}.parquet"
        if p.exists():
            rows += _check_work(tmp_path / "w", f"fuzz{k}")
    assert rows > 0 and elapsed < 120
    # damaged shards are named; the rest of the run finished
    assert not any("failed" in p for p in s.problems()), s.problems()
    record("6 fuzzed COCO shards (byte flips, truncation)", 1, 0, 0)


def _tar_with(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                ti = tarfile.TarInfo(m[0])
                ti.size = len(m[1])
                tf.addfile(ti, io.BytesIO(m[1]))
    return path


def test_hostile_members_never_escape_or_exhaust(tmp_path: Path, record):
    before = set(os.listdir(tmp_path.parent))
    link = tarfile.TarInfo("0003.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("0004.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "0001.jpg"
    dev = tarfile.TarInfo("0005.jpg")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    deep = "[" * 100_000 + "]" * 100_000
    members = [
        ("0001.jpg", jpeg_bytes()), ("0001.txt", b"a normal caption here"),
        ("../../escape/0002.jpg", jpeg_bytes()), ("/abs/0002.txt", b"absolute"),
        link, ("0003.txt", b"symlink image"), hard, ("0004.txt", b"hardlink image"),
        dev, ("0005.txt", b"device image"),
        ("0006.jpg", jpeg_bytes()), ("0006.txt", b"x " * 5_000_000), ("0006.json", deep.encode()),
        ("0007.jpg", jpeg_bytes()), ("0007.txt", b"absurd json"), ("0007.json", json.dumps({"uid": 5, "original_width": 1e300, "url": ["x"]}).encode()),
    ]
    shard = _tar_with(tmp_path / "hostile.tar", members)
    s = run_pipeline(PIPE, make_config(str(shard), tmp_path / "w"))
    assert s.ok
    n = _check_work(tmp_path / "w", "hostile")
    idx = pl.read_parquet(tmp_path / "w" / "index" / "hostile.parquet")
    st = dict(zip(idx["key"], idx["status"]))
    assert st["0001"] == "ok" and st["0003"] != "ok" and st["0004"] != "ok" and st["0005"] != "ok"
    assert n == idx.height >= 7
    assert set(os.listdir(tmp_path.parent)) == before and not (tmp_path / "escape").exists()
    assert not Path("/abs").exists()
    record("hostile members (.., abs, links, device, 10MB caption, deep json)", 1, 0, 0)


@pytest.mark.slow
def test_gzip_bomb_member_is_skipped_quickly(tmp_path: Path, record):
    big = tarfile.TarInfo("0002.jpg")
    big.size = 300 * 1024 * 1024  # 300 MB of zeros, ~300 KB compressed
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        ti = tarfile.TarInfo("0001.jpg")
        data = jpeg_bytes()
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("0001.txt")
        ti.size = 12
        tf.addfile(ti, io.BytesIO(b"fine caption"))

        class Zeros(io.RawIOBase):
            def __init__(self, n):
                self.left = n

            def readinto(self, b):
                k = min(len(b), self.left)
                b[:k] = bytes(k)
                self.left -= k
                return k

        tf.addfile(big, Zeros(big.size))
        ti = tarfile.TarInfo("0002.txt")
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"bomb"))
    assert path.stat().st_size < 2_000_000
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    samples = list(iter_samples(path))
    assert time.perf_counter() - t0 < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KiB: not read into memory
    assert [s.key for s in samples] == ["0001", "0002"]
    assert "member:too_large:jpg" in samples[1].problems
    record("gzip bomb member (300 MB of zeros)", 1, 0, 0)


def test_decompression_bomb_image(tmp_path: Path, record):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buf, format="PNG")  # 400 Mpx, a few hundred KB
    shard = _tar_with(tmp_path / "pxbomb.tar", [("0001.png", buf.getvalue()), ("0001.txt", b"a pixel bomb image")])
    s = run_pipeline(make_pipeline(("image", {})), make_config(str(shard), tmp_path / "w"))
    assert s.ok
    t = pl.read_parquet(tmp_path / "w" / "image" / "pxbomb.parquet")
    assert t["reason_image"][0] == "image:too_many_pixels"
    record("image decompression bomb (20k x 20k PNG)", 1, 0, 0)
