"""The DALI pipeline as the CLIP stage's data path (``device_decoder: dali`` on a local tar): the
image members it is given are our reader's, its preprocessing is open_clip's transform, every row
gets the loader path's reason and score on a shard with every oddity (a corrupt JPEG fails a DALI
batch, which the loader path then takes), and a shard that changed since indexing is an error.
DALI's CPU operators stand in for the GPU; where DALI is not installed (CI) these tests skip."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.io.shards import iter_indexed_samples
from curate.models.dali_preprocess import dali_available
from tests.conftest import jpeg_bytes, shared_data, write_tar

pytestmark = pytest.mark.skipif(not dali_available(), reason="no DALI")


def _encoded(mode: str, size: tuple[int, int], fmt: str, color) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def odd_shard(tmp_path: Path) -> Path:
    good = [jpeg_bytes((60 + 7 * i, 40 + 5 * i), (30 * i % 255, 100, 220 - 15 * i)) for i in range(12)]
    samples = [
        [("jpg", good[0])],
        [],  # caption only
        [("PNG", _encoded("RGB", (50, 30), "PNG", (10, 200, 10)))],  # upper-case extension
        [("jpg", good[1][:300] + b"\x00" * 40)],  # header parses, data does not
        [("jpg", _encoded("CMYK", (48, 40), "JPEG", (10, 200, 30, 5)))],
        [("jpg", jpeg_bytes((400, 300), (90, 90, 200)))],  # over the raw-JPEG limit the test sets
        [("x.jpg", good[2])],  # extension "x.jpg": not an image for either reader
        *[[("jpg", g)] for g in good[3:]],
        [("webp", _encoded("RGB", (33, 44), "WEBP", (200, 200, 0)))],
    ]
    members = []
    for i, images in enumerate(samples):
        members += [(f"s/{i:04d}.{ext}", data) for ext, data in images]
        members.append((f"s/{i:04d}.txt", f"a shape number {i}".encode()))
    return write_tar(tmp_path / "odd.tar", members)


def test_members_are_our_readers_images(tmp_path: Path, pool: Path):
    from curate.io.shards import SAMPLE_KEY_RE
    from curate.models.dali_pipeline import ShardPipeline

    pipe = ShardPipeline(None, "cpu", threads=2, batch_size=5)
    for tar in (odd_shard(tmp_path), pool / "00000.tar"):
        ours = [(s.key, s.image() or b"") for _, s in iter_indexed_samples(tar)]
        theirs = list(pipe.members(str(tar), lambda r: r % 3 != 1))
        assert [r for r, _, _ in theirs] == list(range(len(ours)))
        for (key, data), (row, name, got) in zip(ours, theirs):
            assert (name is None) == (not data)
            if name:
                assert SAMPLE_KEY_RE.match(name).group(1) == key
                assert (got is None) if row % 3 == 1 else (got.tobytes() == data)


@pytest.mark.parametrize("photos", [False, True])
def test_decode_matches_open_clip_transform(pool: Path, photos: bool):
    from curate.models.clip import load_clip
    from curate.models.dali_pipeline import ShardPipeline, decodable
    from curate.models.dali_preprocess import DaliPreprocess

    tar = shared_data("shards/coco-val2017-mini-000000.tar") if photos else pool / "00000.tar"
    clip = load_clip("ViT-B-32", None)
    good = []
    for _, (_, s) in zip(range(60), iter_indexed_samples(tar)):
        try:
            ref = clip.preprocess(Image.open(io.BytesIO(s.image())).convert("RGB"))
        except Exception:  # the pool's corrupt images: not this test's subject
            continue
        if decodable(np.frombuffer(s.image(), dtype=np.uint8), 10**8):
            good.append((s.image(), ref))
    assert len(good) > 30
    pipe = ShardPipeline(DaliPreprocess.from_transform(clip.preprocess), "cpu", 2, 16)
    ours = torch.cat([pipe.decode([np.frombuffer(b, dtype=np.uint8) for b, _ in good[k:k + 16]])
                      for k in range(0, len(good), 16)])
    ref = torch.stack([r for _, r in good])
    assert ours.shape == ref.shape
    # one uint8 step is 1/255/std ~ 0.015 after normalisation; resampling differs by about that
    assert (ours - ref).abs().mean() < 0.01 and (ours - ref).abs().max() < 0.5


def _stage(**params):
    from curate.stages.clip_score import ClipScoreStage

    stage = ClipScoreStage(ClipScoreStage.Params(model="curate-tiny", pretrained=None, batch_size=4, jpeg_draft=False,
                                                 device_decode=True, device_decoder="dali", **params))
    stage.clip("cpu", None)
    return stage


def test_pipeline_path_gives_the_loader_paths_results(tmp_path: Path, monkeypatch):
    """Every row of a subset (caption-only, PNG, corrupt, CMYK, mislabelled, WebP samples among
    them) gets the loader path's outcome: the same reasons, the same scores (within resampling
    rounding where the loader path decodes with PIL). The corrupt JPEG fails its DALI batch, which
    the loader path takes; the batches after it go through DALI again."""
    from curate.models.dali_pipeline import ShardPipeline

    shard = odd_shard(tmp_path)
    keys = [s.key for _, s in iter_indexed_samples(shard)]
    captions = [f"a shape number {i}" for i in range(len(keys))]
    rows = [r for r in range(len(keys)) if r != 8]
    decodes = []
    real = ShardPipeline.decode

    def counted(self, encoded):
        try:
            out = real(self, encoded)
        except Exception:
            decodes.append("failed")
            raise
        decodes.append("ok")
        return out

    monkeypatch.setattr(ShardPipeline, "decode", counted)
    stage = _stage()
    ours, our_failed = stage.embed(str(shard), rows, captions, "cpu", None, keys=keys)
    assert len(decodes) >= 3, "the DALI pipeline was not used"
    assert "ok" in decodes[decodes.index("failed"):], "no batch went through DALI after the corrupt one"
    ref, ref_failed = stage.embed(lambda *a: iter_indexed_samples(shard, *a), rows, captions, "cpu", None)
    # no image member (caption only, a mislabelled one) or a corrupt one: undecodable on both paths
    assert our_failed == ref_failed == {r: "clip:undecodable" for r in (1, 3, 6)}
    assert set(ours) == set(ref) == set(rows) - {1, 3, 6}
    by_pil = {2, 4, len(keys) - 1}  # PNG, CMYK JPEG, WebP: PIL on the loader path
    for r in ours:
        assert abs(ours[r][0] - ref[r][0]) < (2e-2 if r in by_pil else 1e-4), r


def test_pipeline_path_leaves_a_changed_shard_and_missing_rows_to_the_loader_path(tmp_path: Path, caplog):
    """A key that differs from the index (the shard changed, or DALI grouped members otherwise)
    hands the rest of the shard to the loader path; rows the index has past the tar's end get no
    result (clip:missing_image)."""
    shard = odd_shard(tmp_path)
    keys = [s.key for _, s in iter_indexed_samples(shard)]
    captions = ["c"] * (len(keys) + 3)
    stage = _stage()
    res, failed = stage.embed(str(shard), list(range(len(keys))), captions, "cpu", None,
                              keys=keys[:5] + ["zzz"] + keys[6:])
    assert "the index says zzz" in caplog.text
    assert set(res) == set(range(len(keys))) - {1, 3, 6} and set(failed) == {1, 3, 6}
    res, failed = stage.embed(str(shard), list(range(len(keys) + 3)), captions, "cpu", None,
                              keys=keys + ["x1", "x2", "x3"])
    assert set(res) == set(range(len(keys))) - {1, 3, 6} and set(failed) == {1, 3, 6}


def test_only_local_uncompressed_tars_go_to_dali(tmp_path: Path):
    import gzip

    from curate.io.tar_members import is_local_plain_tar

    tar = odd_shard(tmp_path)
    gz = tmp_path / "odd.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    assert is_local_plain_tar(str(tar))
    assert not is_local_plain_tar(str(gz)) and not is_local_plain_tar(str(tmp_path / "nope.tar"))
    assert not is_local_plain_tar("s3://bucket/odd.tar") and not is_local_plain_tar(lambda: None)
