"""text_mask (RapidOCR text regions; CAT's rules) and clip_score's T-MARS masking."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageDraw, ImageFont

from curate.algorithms.text_regions import caption_overlap, covered_share, fill_regions, quad_to_box
from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from tests.conftest import make_config, make_pipeline, shared_data, write_tar

TINY = {"model": "curate-tiny", "pretrained": None}


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def rendered(text: str, size=(480, 320), at=(40, 130), bg=(30, 110, 190)) -> Image.Image:
    """A flat background with ``text`` in white, 48 px (Pillow's embedded font: the same everywhere)."""
    im = Image.new("RGB", size, bg)
    ImageDraw.Draw(im).text(at, text, font=ImageFont.load_default(size=48), fill=(255, 255, 255))
    return im


def scene(size=(480, 320)) -> Image.Image:
    """A textless picture: a red disc on green."""
    im = Image.new("RGB", size, (40, 150, 60))
    ImageDraw.Draw(im).ellipse((160, 80, 320, 240), fill=(210, 40, 40))
    return im


@pytest.fixture(scope="module")
def text_pool(tmp_path_factory) -> Path:
    """Six samples: the caption spelled in the image, text beside an unrelated caption, a textless
    scene, a corrupt JPEG, a sample without image, and a truncated JPEG."""
    out = tmp_path_factory.mktemp("textpool")
    good = _jpeg(rendered("SUMMER SALE"))
    samples = [("spelled", _jpeg(rendered("SUMMER SALE")), "summer sale"),
               ("beside", _jpeg(rendered("OPEN 24 HOURS")), "a blue wall at night"),
               ("plain", _jpeg(scene()), "a red disc on grass"),
               ("corrupt", b"\xff\xd8 this is no jpeg", "a broken file"),
               ("noimage", None, "a caption without image"),
               ("truncated", good[: len(good) // 3], "summer sale half an image")]
    members = []
    for key, data, caption in samples:
        if data is not None:
            members.append((f"{key}.jpg", data))
        members.append((f"{key}.txt", caption.encode()))
    write_tar(out / "000000.tar", members)
    return out


def _run(pool: Path, work: Path, *stages) -> pl.DataFrame:
    s = run_pipeline(make_pipeline(*stages), make_config(str(pool / "*.tar"), work))
    assert s.ok, s.problems()
    return pl.read_parquet(work / "text_mask" / "*.parquet").join(
        pl.read_parquet(work / "index" / "*.parquet", columns=["uid", "key"]), on="uid")


def test_regions_area_and_masking_helpers():
    assert covered_share([]) == 0.0
    # two overlapping halves count once; a box is clipped to the image
    assert covered_share([[0, 0, 0.5, 1], [0.25, 0, 0.75, 1]]) == pytest.approx(0.75)
    assert covered_share([[0.5, 0.5, 2.0, 2.0]]) == pytest.approx(0.25)
    assert quad_to_box([[10, 20], [110, 22], [110, 60], [10, 58]], 200, 100) == [0.05, 0.2, 0.55, 0.6]
    assert quad_to_box([[-5, -5], [300, -5], [300, 300], [-5, 300]], 200, 100) == [0, 0, 1, 1]

    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:] = (10, 200, 30)
    rgb[40:60, 50:150] = 255  # "text": white on green
    out = fill_regions(rgb, [[0.25, 0.4, 0.75, 0.6]])
    assert (out[40:60, 50:150] == (10, 200, 30)).all()  # filled with the colour around it
    assert (out[:40] == rgb[:40]).all() and (rgb[40:60, 50:150] == 255).all()  # outside and input untouched
    # a box covering the whole image has no ring: the image's mean colour is used
    full = fill_regions(rgb, [[0, 0, 1, 1]])
    assert (full == np.round(rgb.reshape(-1, 3).mean(0)).astype(np.uint8)).all()
    assert (fill_regions(rgb, []) == rgb).all()

    assert caption_overlap("Summer SALE!", "SUMMER SALE") == 1.0
    assert caption_overlap("a summer sale poster", "SUMMER SALE") == pytest.approx(2 / 3)  # "a" is no word
    assert caption_overlap("summer sale", "SUMMERSALE!") == 1.0  # a missed space
    assert caption_overlap("red disc", "") == 0.0
    assert caption_overlap("!! a", "SALE") is None


def test_text_regions_caption_rules_and_broken_images(text_pool: Path, tmp_path: Path):
    t = _run(text_pool, tmp_path / "w", ("text_mask", {"max_caption_overlap": 0.5})).sort("key")
    by = {r["key"]: r for r in t.to_dicts()}
    spelled, beside, plain = by["spelled"], by["beside"], by["plain"]
    assert "SUMMER" in spelled["ocr_text"] and spelled["caption_text_overlap"] == 1.0
    assert spelled["reason_text_mask"] == "text_mask:caption_is_text" and not spelled["keep_text_mask"]
    # the box sits where the text was drawn (x from 40 px, y from ~140 px of 480 x 320)
    (x0, y0, x1, y1), = spelled["text_boxes"]
    assert 0.03 < x0 < 0.12 and 0.35 < y0 < 0.5 and 0.55 < x1 < 0.85 and 0.5 < y1 < 0.65
    assert spelled["text_area"] == pytest.approx((x1 - x0) * (y1 - y0), abs=0.02)
    assert "24" in beside["ocr_text"] and beside["caption_text_overlap"] == 0.0 and beside["keep_text_mask"]
    assert plain["text_boxes"] == [] and plain["text_area"] == 0.0 and plain["keep_text_mask"]
    assert by["corrupt"]["reason_text_mask"] == "text_mask:undecodable"
    assert by["noimage"]["keep_text_mask"] is None  # the index dropped it (index:missing_image): not judged again
    assert by["truncated"]["reason_text_mask"] in ("text_mask:undecodable", None)  # PIL may pad a truncated JPEG
    assert all(by[k]["text_boxes"] is None and by[k]["text_area"] is None for k in ("corrupt", "noimage"))

    # the same inputs give the same table; boxes only (no recognition) give the same boxes
    again = _run(text_pool, tmp_path / "w2", ("text_mask", {"max_caption_overlap": 0.5})).sort("key")
    assert again.equals(t)
    boxes = _run(text_pool, tmp_path / "w3", ("text_mask", {"recognise": False, "max_text_area": 0.05})).sort("key")
    assert boxes["ocr_text"].is_null().all()
    b = {r["key"]: r for r in boxes.to_dicts()}
    assert b["spelled"]["text_boxes"] == spelled["text_boxes"] and b["spelled"]["reason_text_mask"] == "text_mask:text_area"
    # a decompression-bomb cap is a reason before any decode
    capped = _run(text_pool, tmp_path / "w4", ("text_mask", {"max_pixels": 100_000})).sort("key")
    assert set(capped.filter(pl.col("key").is_in(["spelled", "beside", "plain"]))["reason_text_mask"]) == \
        {"text_mask:too_many_pixels"}
    # unread, the detector's region on the red disc stays (read, it is no text and is dropped)
    assert len(b["plain"]["text_boxes"]) == 1 and 0.3 < b["plain"]["text_boxes"][0][0] < 0.5


def test_masked_clip_score_changes_only_images_with_text(text_pool: Path, tiny_ckpt: Path, tmp_path: Path):
    clip = {"model": "curate-tiny", "pretrained": str(tiny_ckpt), "all_rows": True}
    work = tmp_path / "w"
    stages = [("text_mask", {}), ("clip_score", clip)]
    masked = make_pipeline(*stages, ("clip_score", clip | {"mask_text_from": "text_mask"}))
    masked.stages[-1] = masked.stages[-1].model_copy(update={"id": "clip_masked"})
    s = run_pipeline(masked, make_config(str(text_pool / "*.tar"), work))
    assert s.ok, s.problems()
    key = pl.read_parquet(work / "index" / "*.parquet", columns=["uid", "key"])
    plain = pl.read_parquet(work / "clip_score" / "*.parquet", columns=["uid", "clip_score"]).join(key, on="uid")
    mask = pl.read_parquet(work / "clip_masked" / "*.parquet", columns=["uid", "clip_score"]).join(key, on="uid")
    a = dict(zip(plain["key"], plain["clip_score"]))
    b = dict(zip(mask["key"], mask["clip_score"]))
    assert a["plain"] == b["plain"]  # no text found: the very same input
    assert abs(a["spelled"] - b["spelled"]) > 1e-4 and abs(a["beside"] - b["beside"]) > 1e-4
    assert b["corrupt"] is None and b["noimage"] is None


def test_mistakes_named_before_any_work(text_pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="max_caption_overlap needs recognise"):
        run_pipeline(make_pipeline(("text_mask", {"recognise": False, "max_caption_overlap": 0.5})),
                     make_config(str(text_pool / "*.tar"), tmp_path / "a"))
    with pytest.raises(ConfigError, match="mask_text_from names a text_mask stage"):
        run_pipeline(make_pipeline("text", ("clip_score", TINY | {"mask_text_from": "text"})),
                     make_config(str(text_pool / "*.tar"), tmp_path / "b"))
    with pytest.raises(ConfigError, match="not earlier in the pipeline"):
        run_pipeline(make_pipeline(("clip_score", TINY | {"mask_text_from": "text_mask"})),
                     make_config(str(text_pool / "*.tar"), tmp_path / "c"))


def test_real_photos_with_signs():
    """COCO photos: a licence plate and a beer label are read; photos without text have no region."""
    from curate.models.text_detector import detect_text, load_text_detector

    folder = shared_data("images/coco_val2017_mini")
    engine = load_text_detector(640)

    def read(name: str) -> list:
        im = Image.open(folder / name).convert("RGB")
        im.thumbnail((640, 640))
        return detect_text(engine, np.asarray(im))

    plate = " ".join(r.text for r in read("000000142585.jpg") if r.confidence >= 0.5)
    assert "TN-09-AH-2872" in plate
    label = " ".join(r.text for r in read("000000092660.jpg") if r.confidence >= 0.5)
    assert label.startswith("Amb")  # "Ambrosian" on the bottle: read whole only at higher detect_side
    for r in read("000000142585.jpg"):
        assert 0 <= r.box[0] < r.box[2] <= 1 and 0 <= r.box[1] < r.box[3] <= 1
    assert read("000000011813.jpg") == [] and read("000000019221.jpg") == []  # no text in these


@pytest.mark.slow
def test_synthetic_text_defects_are_what_the_rules_remove(tmp_path: Path):
    """The pool's opt-in defects: a sign's words in the image that the caption only repeats (CAT's
    rule drops them, and no clean pair), and one spam template (caption MinHash groups them)."""
    from curate.tools.synth import synthesize

    synthesize(tmp_path / "pool", samples=120, shards=2, seed=5,
               fractions={"text_caption": 0.2, "templated_caption": 0.1})
    truth = pl.read_parquet(tmp_path / "pool" / "ground_truth.parquet", columns=["uid", "label"])
    assert set(truth["label"]) == {"clean", "text_caption", "templated_caption"}
    work = tmp_path / "w"
    s = run_pipeline(make_pipeline(("text_mask", {"max_caption_overlap": 0.5}),
                                   ("dedup", {"exact": [], "phash_radius": None, "caption_jaccard": 0.85})),
                     make_config(str(tmp_path / "pool" / "*.tar"), work))
    assert s.ok, s.problems()
    tm = pl.read_parquet(work / "text_mask" / "*.parquet").join(truth, on="uid")
    dropped = tm.filter(pl.col("reason_text_mask") == "text_mask:caption_is_text")
    signs = tm.filter(pl.col("label") == "text_caption").height
    assert set(dropped["label"]) == {"text_caption"} and dropped.height >= 0.9 * signs
    dd = pl.read_parquet(work / "dedup" / "*.parquet").join(truth, on="uid")
    spam = dd.filter(pl.col("label") == "templated_caption")
    # one template: one group, one kept (clean captions of the same scene may group too: same words)
    assert spam.height >= 5 and spam["dup_group"].null_count() == 0 and spam["dup_group"].n_unique() == 1
    assert spam["keep_dedup"].sum() == 1 and set(spam["reason_dedup"].drop_nulls()) == {"dedup:caption_near"}


def test_filled_regions_leave_no_text_to_read():
    """T-MARS's masking removes what the detector read: detected again, the masked image has no text."""
    from curate.models.text_detector import detect_text, load_text_detector

    engine = load_text_detector(640)
    for words, bg in (("SUMMER SALE", (30, 110, 190)), ("FREE WIFI", (200, 200, 60)), ("OPEN 24 HOURS", (90, 20, 20))):
        rgb = np.asarray(rendered(words, bg=bg))
        boxes = [r.box for r in detect_text(engine, rgb) if r.confidence >= 0.5]
        assert boxes
        assert [r for r in detect_text(engine, fill_regions(rgb, boxes)) if r.confidence >= 0.5] == []


def test_a_detector_failure_is_a_reason_not_a_failed_shard(text_pool: Path, tmp_path: Path, monkeypatch):
    import curate.models.text_detector as td

    real = td.detect_text

    def flaky(engine, rgb, recognise=True):
        if rgb.mean() < 100:  # the textless green scene: darker than the blue posters
            raise RuntimeError("onnxruntime: invalid input")
        return real(engine, rgb, recognise)

    monkeypatch.setattr(td, "detect_text", flaky)
    t = _run(text_pool, tmp_path / "w", ("text_mask", {}))
    by = {r["key"]: r for r in t.to_dicts()}
    assert by["plain"]["reason_text_mask"] == "text_mask:detector_failed"
    assert by["spelled"]["keep_text_mask"] and "SUMMER" in by["spelled"]["ocr_text"]


def test_a_missing_ocr_extra_is_named_in_preflight(monkeypatch):
    """Without the ocr extra (rapidocr), the stage refuses before any work and says which extra to
    install; nsfw and gs:// do the same for theirs."""
    import builtins
    import sys

    from curate.core.errors import ConfigError
    from curate.io.storage import filesystem
    from curate.stages.nsfw import NsfwStage
    from curate.stages.text_mask import TextMaskStage

    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name.split(".")[0] in ("rapidocr_onnxruntime", "nudenet", "gcsfs"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.split(".")[0] in ("rapidocr_onnxruntime", "nudenet", "gcsfs")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", without)
    from curate.models import nsfw_detector

    monkeypatch.setattr(nsfw_detector, "load_nsfw_detector", lambda *a: __import__("nudenet"))
    problems = TextMaskStage(TextMaskStage.Params()).preflight()
    assert len(problems) == 1 and "pip install 'curate[ocr]'" in problems[0]
    problems = NsfwStage(NsfwStage.Params()).preflight()
    assert len(problems) == 1 and "pip install 'curate[nsfw]'" in problems[0]
    with pytest.raises(ConfigError, match=r"curate\[gcs\]"):
        filesystem("gs://bucket/shards")
