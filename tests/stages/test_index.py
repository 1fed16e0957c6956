from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from curate.runner.pipeline import run_pipeline
from tests.conftest import jpeg_bytes, make_config, make_pipeline, write_tar


def test_index_on_synthetic_pool(pool: Path, tmp_path: Path):
    summary = run_pipeline(make_pipeline("index"), make_config(str(pool / "*.tar"), tmp_path / "w"))
    assert summary.ok
    df = pl.read_parquet(tmp_path / "w" / "index" / "*.parquet")
    truth = pl.read_parquet(pool / "ground_truth.parquet")
    assert df.height == truth.height == 400
    # The synthetic json carries a uid (DataComp layout): it is used as is.
    assert set(df["uid"]) == set(truth["uid"])
    ok = df.filter(pl.col("status") == "ok")
    assert ok.height == 400
    assert (df["sha256"].str.len_chars() == 64).all()
    clean = df.join(truth, on="uid").filter(pl.col("label") == "clean")
    assert (clean["width"] == clean["original_width"]).all()
    assert clean["image_format"].unique().to_list() == ["jpeg"]
    corrupt = df.join(truth, on="uid").filter(pl.col("label") == "corrupt_image")
    assert corrupt["width"].null_count() >= 1  # random bytes have no header


def test_index_row_level_problems(tmp_path: Path):
    shard = write_tar(tmp_path / "bad-000.tar", [
        ("a.jpg", jpeg_bytes()), ("a.txt", b"fine caption here"),
        ("b.jpg", b""), ("b.txt", b"zero byte image"),
        ("c.jpg", jpeg_bytes()),  # no caption
        ("d.txt", b"no image"),
        ("e.jpg", jpeg_bytes()), ("e.txt", "caf\xe9".encode("latin-1")),
        ("f.jpg", jpeg_bytes()), ("f.txt", b"   "),
        ("g.jpg", jpeg_bytes()), ("g.txt", b"ok"), ("g.json", b"{not json"),
    ])
    summary = run_pipeline(make_pipeline("index"), make_config(str(shard), tmp_path / "w"))
    assert summary.ok
    df = pl.read_parquet(tmp_path / "w" / "index" / "bad-000.parquet")
    status = dict(zip(df["key"], df["status"]))
    assert status == {"a": "ok", "b": "empty_image", "c": "missing_caption", "d": "missing_image",
                      "e": "caption_not_utf8", "f": "empty_caption", "g": "ok"}
    g = df.filter(pl.col("key") == "g")
    assert g["error"][0] == "json:unparsable"
    reasons = dict(zip(df["key"], df["reason_index"]))
    assert reasons["b"] == "index:empty_image" and reasons["a"] is None
    assert df["uid"].n_unique() == df.height


def test_truncated_shard_processes_prefix_and_fails_run(pool: Path, tmp_path: Path):
    data = (pool / "00001.tar").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "in" / "good.tar").write_bytes((pool / "00002.tar").read_bytes())
    summary = run_pipeline(make_pipeline("index"), make_config(str(tmp_path / "in" / "*.tar"), tmp_path / "w"))
    assert not summary.ok
    assert any("cut" in p and "damaged" in p for p in summary.problems())
    assert pl.read_parquet(tmp_path / "w" / "index" / "cut.parquet").height > 10
    assert pl.read_parquet(tmp_path / "w" / "index" / "good.parquet").height == 100
    # A rerun still reports the damaged shard (read back from its stats), without recomputing.
    again = run_pipeline(make_pipeline("index"), make_config(str(tmp_path / "in" / "*.tar"), tmp_path / "w"))
    assert not again.ok and again.stages[0].skipped == 2 and again.stages[0].done == 0


def _encoded(fmt: str, size=(37, 21), **kw) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_header_sizes_match_pil_for_every_format(fmt: str):
    """The index reads sizes without PIL's plugins; format and sizes must be what PIL reports, and
    an overwritten header is still judged by PIL (garbage stays None)."""
    import io

    from PIL import Image

    from curate.io.images import image_header

    data = _encoded(fmt)
    with Image.open(io.BytesIO(data)) as im:
        expect = (im.format.lower(), im.width, im.height)
    assert image_header(data, None) == expect == (fmt.lower(), 37, 21)
    # a file cut inside its header: no size, or the true one (a GIF's sizes are in its first 10 bytes)
    assert image_header(data[:12], None) in ((None, None, None), expect)
    for broken in (data[:4] + b"\x00" * 40, b"\x00" * 64, data[:3] + b"\xff" * 61):
        try:
            with Image.open(io.BytesIO(broken)) as im:
                pil = ((im.format or "").lower(), im.width, im.height)
        except Exception:
            pil = (None, None, None)
        assert image_header(broken, None) == pil


def test_header_sizes_ignore_exif_orientation():
    """A JPEG rotated by EXIF keeps its stored sizes (PIL's width and height, what DataComp's
    original sizes describe), not the displayed ones."""
    from PIL import Image

    from curate.io.images import image_header

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    assert image_header(_encoded("JPEG", (40, 10), exif=exif.tobytes())) == ("jpeg", 40, 10)


def test_metadata_columns_follow_the_row_rules():
    """The metadata path works on whole columns; its size rule is _int_or_none's (any integer or
    float type) and its empty-caption rule is ``not caption.strip()`` (every Unicode space)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.algorithms.whitespace import ONLY_SPACE, split_count
    from curate.stages.index import _int_or_none, _sizes

    values = {"int8": [None, -3, 0, 127], "uint8": [0, 255, None], "uint32": [0, 2**31 - 1, 2**31, 2**32 - 1],
              "int64": [-1, 2**31 - 1, 2**31, 2**62], "uint64": [0, 2**31, 2**63 + 5],
              "float32": [2.0**31, 3.9, -0.5, float("nan")], "float64": [float("inf"), 2**31 - 0.5, 0.0, None],
              "bool_": [True, False], "string": ["300", None]}
    for name, v in values.items():
        arr = pa.array(v, getattr(pa, name)())
        assert _sizes(pa.chunked_array([arr]), len(v)).to_pylist() == [_int_or_none(x) for x in arr.to_pylist()], name
    assert _sizes(None, 3).to_pylist() == [None] * 3
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    captions = ["", *spaces, "".join(spaces), " a ", "\u200b", "\ufeff", "x\n", "\n\t\u3000", "\x00", "日本"]
    got = pc.match_substring_regex(pa.array(captions), ONLY_SPACE).to_pylist()
    assert got == [not c.strip() for c in captions]
    words = [*captions, " ".join(spaces), "a\u3000b\x1cc\u200bd e\n", "ein  Wort\t und\xa0mehr"]
    assert split_count(words) == [len(c.split()) for c in words]


def test_a_tar_pool_in_another_layout_fails_its_shards_instead_of_dropping_them(tmp_path: Path):
    """Captions under a name curate does not read (.text): every row would be missing_caption."""
    img = jpeg_bytes()
    write_tar(tmp_path / "a.tar", [m for i in range(12) for m in ((f"{i:04d}.jpg", img), (f"{i:04d}.text", b"a dog"))])
    summary = run_pipeline(make_pipeline(("text", {})), make_config(str(tmp_path / "a.tar"), tmp_path / "w"))
    assert not summary.ok
    assert any("index: shard a failed" in p and "12 of 12 rows (100%) are missing_caption" in p
               for p in summary.problems()), summary.problems()
    # a json key named otherwise is mapped like a metadata column
    write_tar(tmp_path / "b.tar", [m for i in range(12) for m in (
        (f"{i:04d}.jpg", img), (f"{i:04d}.json", b'{"alt_text": "a brown dog on grass"}'))])
    pipe = make_pipeline(("index", {"columns": {"caption": "alt_text"}}), ("text", {}))
    assert run_pipeline(pipe, make_config(str(tmp_path / "b.tar"), tmp_path / "w2")).ok
    idx = pl.read_parquet(tmp_path / "w2" / "index" / "b.parquet")
    assert idx["caption"].to_list() == ["a brown dog on grass"] * 12 and set(idx["status"]) == {"ok"}
