"""The privacy pass end to end on real photos: pipelines/privacy.yaml, then `curate export
--blur-faces --redact-pii`: faces blurred (only the face regions change), images without faces
byte-identical, captions redacted in every output, boxes and kinds in Parquet, the manifest names
detector, threshold and blur; the shards read by webdataset. Refusals name the missing stage."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curate.engine import make_executor
from curate.io.parquet import RefusedOutput
from curate.report.export import ExportSpec, export
from curate.runner.pipeline import run_pipeline
from curate.runner.registry import load_pipeline
from tests.conftest import ROOT, make_config, make_pipeline, shared_data, write_tar

PHOTOS = {  # COCO file: caption
    "000000394940": "a boy eating cake, call his mum on +44 20 7946 0958",  # one large face
    "000000338905": "friends at a party, pics from jane.doe@example.com",  # several faces
    "000000109313": "a man in a green shirt",  # one face
    "000000018575": "a living room with a television",  # no person
    "000000019221": "a kitchen, order #1234567890 shipped",  # no person; a number that is no phone
}


@pytest.fixture(scope="module")
def privacy_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = shared_data("images/coco_val2017_mini")
    out = tmp_path_factory.mktemp("privacy")
    members = []
    for name, caption in PHOTOS.items():
        members += [(f"{name}.jpg", (folder / f"{name}.jpg").read_bytes()), (f"{name}.txt", caption.encode())]
    (out / "pool").mkdir()
    write_tar(out / "pool" / "00000.tar", members)
    work = out / "work"
    s = run_pipeline(load_pipeline(ROOT / "pipelines" / "privacy.yaml"), make_config(str(out / "pool" / "*.tar"), work))
    assert s.ok, s.problems()
    return out, work


def _tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _outside(shape: tuple[int, int], boxes: list[list[float]]) -> np.ndarray:
    """Pixels the blur cannot reach: farther from every box than its 10 % growth plus four sigma
    of the Gaussian (sigma 0.1 x the largest face's longer side), as img2dataset's blurrer."""
    h, w = shape
    px = [(x0 * w, y0 * h, x1 * w, y1 * h) for x0, y0, x1, y1 in boxes]
    sigma = 0.1 * max(max(b[2] - b[0], b[3] - b[1]) for b in px)
    mask = np.ones(shape, dtype=bool)
    for x0, y0, x1, y1 in px:
        m = 0.1 * max(x1 - x0, y1 - y0) + 4 * sigma + 2
        mask[max(0, int(y0 - m)):int(y1 + m) + 1, max(0, int(x0 - m)):int(x1 + m) + 1] = False
    return mask


def test_blurred_and_redacted_export(privacy_run: tuple[Path, Path], tmp_path: Path):
    out_root, work = privacy_run
    with make_executor(make_config(str(out_root / "pool" / "*.tar"), work)) as ex:
        m = export(str(work), tmp_path / "out", ex, ExportSpec(blur_faces=True, redact_pii=True))
    meta = pl.read_parquet(tmp_path / "out" / "metadata" / "*.parquet")
    by = {r["key"]: r for r in meta.to_dicts()}
    assert set(by) == set(PHOTOS)
    with_faces = [k for k, r in by.items() if r["face_count"]]
    assert sorted(with_faces) == sorted(list(PHOTOS)[:3])
    assert m["privacy"]["blur_faces"]["images_blurred"] == 3 and m["privacy"]["blur_faces"]["threshold"] == 0.5
    assert "CenterFace" in m["privacy"]["blur_faces"]["detector"] and "sigma" in m["privacy"]["blur_faces"]["blur"]
    assert m["privacy"]["redact_pii"]["captions_redacted"] == 2
    # captions: redacted in metadata, pool, .txt and .json; the number that is no phone stays
    assert by["000000394940"]["caption"] == "a boy eating cake, call his mum on <PHONE>"
    assert by["000000338905"]["caption"] == "friends at a party, pics from <EMAIL>"
    assert by["000000019221"]["caption"] == PHOTOS["000000019221"]
    pool = pl.read_parquet(tmp_path / "out" / "pool" / "*.parquet")
    assert not pool["caption"].str.contains("example.com|7946").any()
    assert by["000000338905"]["pii_kinds"] == ["email"] and by["000000338905"]["face_bboxes"]
    members = _tar(tmp_path / "out" / "shards" / "00000.tar")
    folder = shared_data("images/coco_val2017_mini")
    for key in {k.split(".")[0] for k in members}:
        info = json.loads(members[f"{key}.json"])
        name = info["key"]
        text = members[f"{key}.txt"].decode()
        assert text == by[name]["caption"] and info["caption"] == text
        original = (folder / f"{name}.jpg").read_bytes()
        if name not in with_faces:  # no face: the very bytes of the input
            assert members[f"{key}.jpg"] == original and "face_bboxes" not in info
            continue
        assert info["face_bboxes"] == by[name]["face_bboxes"]
        a = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=np.float64)
        b = np.asarray(Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB"), dtype=np.float64)
        assert a.shape == b.shape
        diff = np.abs(a - b).mean(axis=2)
        outside = _outside(diff.shape, info["face_bboxes"])
        h, w = diff.shape
        inside = np.zeros_like(outside)
        for x0, y0, x1, y1 in info["face_bboxes"]:
            inside[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = True
        # outside the faces only JPEG's requantisation at quality 95; inside, the face is gone
        assert diff[outside].mean() < 1.5, (name, diff[outside].mean())
        assert diff[inside].mean() > 4 * diff[outside].mean() and diff[inside].mean() > 3, (name, diff[inside].mean())
    import webdataset as wds

    got = list(wds.WebDataset(str(tmp_path / "out" / "shards" / "00000.tar"), shardshuffle=False).decode("pil")
               .to_tuple("jpg", "txt"))
    assert len(got) == 5 and all(im.size[0] > 0 for im, _ in got)


def test_the_blurred_export_is_the_same_twice(privacy_run: tuple[Path, Path], tmp_path: Path):
    out_root, work = privacy_run
    with make_executor(make_config(str(out_root / "pool" / "*.tar"), work)) as ex:
        export(str(work), tmp_path / "a", ex, ExportSpec(blur_faces=True, redact_pii=True))
        export(str(work), tmp_path / "b", ex, ExportSpec(blur_faces=True, redact_pii=True))
    assert _tar(tmp_path / "a" / "shards" / "00000.tar") == _tar(tmp_path / "b" / "shards" / "00000.tar")


def test_an_export_without_the_stages_is_refused_with_the_fix(privacy_run: tuple[Path, Path], tmp_path: Path):
    out_root, _ = privacy_run
    work = tmp_path / "plain"
    assert run_pipeline(make_pipeline(("nsfw", {})), make_config(str(out_root / "pool" / "*.tar"), work)).ok
    with make_executor(make_config(str(out_root / "pool" / "*.tar"), work)) as ex:
        with pytest.raises(RefusedOutput, match="run a faces stage"):
            export(str(work), tmp_path / "o1", ex, ExportSpec(blur_faces=True))
        with pytest.raises(RefusedOutput, match="caption_pii"):
            export(str(work), tmp_path / "o2", ex, ExportSpec(redact_pii=True))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_the_report_shows_faces_blurred_and_captions_redacted(privacy_run: tuple[Path, Path], tmp_path: Path):
    from curate.report.html import write_report

    _, work = privacy_run
    page = write_report(work, out=tmp_path / "report").read_text()
    assert "<h2>Faces</h2>" in page and "<h2>Personal data in captions</h2>" in page
    assert "in 3 of 5 image(s)" in page and "2 of 5 caption(s)" in page
    assert "&lt;EMAIL&gt;" in page and "&lt;PHONE&gt;" in page
    assert "example.com" not in page and "7946" not in page
    thumbs = sorted((tmp_path / "report" / "gallery").glob("blurred_*.png"))
    assert len(thumbs) == 3 and all(f"gallery/{t.name}" in page for t in thumbs)
