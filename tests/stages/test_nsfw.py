"""nsfw (NudeNet's detector, weights inside its wheel): scores, labels, the rule, broken images."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageDraw

from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from tests.conftest import make_config, make_pipeline, shared_data, write_tar


def _jpeg(colour, size=(480, 320)) -> bytes:
    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).ellipse((160, 80, 320, 240), fill=(210, 40, 40))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nsfw_pool(tmp_path_factory) -> Path:
    """Two clean scenes (green and blue), a corrupt JPEG, a sample without image, a truncated JPEG."""
    out = tmp_path_factory.mktemp("nsfwpool")
    good = _jpeg((40, 150, 60))
    samples = [("green", good), ("blue", _jpeg((30, 60, 200))), ("corrupt", b"\xff\xd8 no jpeg"), ("noimage", None),
               ("truncated", good[: len(good) // 3])]
    members = []
    for key, data in samples:
        if data is not None:
            members.append((f"{key}.jpg", data))
        members.append((f"{key}.txt", f"a picture called {key}".encode()))
    write_tar(out / "000000.tar", members)
    return out


def _run(pool: Path, work: Path, params: dict) -> dict[str, dict]:
    s = run_pipeline(make_pipeline(("nsfw", params)), make_config(str(pool / "*.tar"), work))
    assert s.ok, s.problems()
    t = pl.read_parquet(work / "nsfw" / "*.parquet").join(
        pl.read_parquet(work / "index" / "*.parquet", columns=["uid", "key"]), on="uid")
    return {r["key"]: r for r in t.to_dicts()}


def test_clean_scenes_score_zero_and_broken_images_are_reasons(nsfw_pool: Path, tmp_path: Path):
    by = _run(nsfw_pool, tmp_path / "w", {})
    for key in ("green", "blue"):
        assert by[key]["nsfw_score"] == 0.0 and by[key]["nsfw_labels"] == [] and by[key]["keep_nsfw"]
    assert by["corrupt"]["reason_nsfw"] == "nsfw:undecodable" and by["corrupt"]["nsfw_score"] is None
    assert by["noimage"]["keep_nsfw"] is None  # the index dropped it: not judged again
    assert by["truncated"]["reason_nsfw"] in ("nsfw:undecodable", None)  # PIL may pad a truncated JPEG
    assert _run(nsfw_pool, tmp_path / "w2", {}) == by  # the same inputs, the same table
    capped = _run(nsfw_pool, tmp_path / "w3", {"max_pixels": 100_000})
    assert capped["green"]["reason_nsfw"] == "nsfw:too_many_pixels"


def test_the_rule_counts_only_the_chosen_classes(nsfw_pool: Path, tmp_path: Path, monkeypatch):
    """A detector that finds an exposed breast and a face on the blue scene (and fails on the green
    one): the image is dropped with the exposed class's score; the face does not count; a detector
    error is that row's reason; with max_score null the score stays and nothing is dropped."""
    import curate.models.nsfw_detector as nd

    def fake(detector, rgb):
        if rgb[..., 1].mean() > 120:  # the green scene
            raise RuntimeError("onnxruntime: invalid input")
        return [("FACE_FEMALE", 0.95), ("FEMALE_BREAST_EXPOSED", 0.7), ("FEMALE_BREAST_EXPOSED", 0.4)]

    monkeypatch.setattr(nd, "detect_nsfw", fake)
    by = _run(nsfw_pool, tmp_path / "w", {})
    blue = by["blue"]
    assert blue["nsfw_score"] == pytest.approx(0.7) and blue["nsfw_labels"] == ["FEMALE_BREAST_EXPOSED"]
    assert blue["reason_nsfw"] == "nsfw:explicit" and not blue["keep_nsfw"]
    assert by["green"]["reason_nsfw"] == "nsfw:detector_failed"
    assert _run(nsfw_pool, tmp_path / "w2", {"max_score": 0.8})["blue"]["keep_nsfw"]
    scored = _run(nsfw_pool, tmp_path / "w3", {"max_score": None})["blue"]
    assert scored["keep_nsfw"] and scored["nsfw_score"] == pytest.approx(0.7)
    faces = _run(nsfw_pool, tmp_path / "w4", {"classes": ["FACE_FEMALE"]})["blue"]
    assert faces["nsfw_score"] == pytest.approx(0.95) and faces["reason_nsfw"] == "nsfw:explicit"


def test_mistakes_named_before_any_work(nsfw_pool: Path, tmp_path: Path):
    for classes, msg in ((["FEMALE_BREAST_EXPOSED", "NUDE"], "unknown class.*NUDE.*FACE_FEMALE"),
                         ([], "at least one class")):
        with pytest.raises(ConfigError, match=msg):
            run_pipeline(make_pipeline(("nsfw", {"classes": classes})), make_config(str(nsfw_pool / "*.tar"), tmp_path))
    assert not (tmp_path / "nsfw").exists()


def test_real_photos():
    """COCO val2017 (a safe-for-work set): the default threshold drops none of these photos, the
    highest-scoring of the 159 among them; faces are found where there are people."""
    from curate.models.nsfw_detector import EXPLICIT, detect_nsfw, load_nsfw_detector

    folder = shared_data("images/coco_val2017_mini")
    detector = load_nsfw_detector(1)

    def found(name: str) -> list[tuple[str, float]]:
        im = Image.open(folder / name).convert("RGB")
        im.thumbnail((640, 640))
        return detect_nsfw(detector, np.asarray(im))

    for name in ("000000034417.jpg", "000000128598.jpg", "000000117425.jpg", "000000011813.jpg"):
        assert max([s for c, s in found(name) if c in EXPLICIT], default=0.0) < 0.6, name
    assert "FACE_FEMALE" in [c for c, _ in found("000000022892.jpg")]
