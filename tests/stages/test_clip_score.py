from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.io.shards import iter_samples
from curate.models.clip import ModelError, load_clip
from curate.models.dali_preprocess import dali_available
from curate.runner.pipeline import run_pipeline
from curate.io.embeddings import embeddings
from tests.conftest import (HANG_MAGIC, jpeg_bytes, make_config, make_pipeline, shared_data, tables_equal_dir,
                            write_tar)

TINY = {"model": "curate-tiny", "pretrained": None}


def _pipe(ckpt: Path, rank: dict | None = None, **params):
    stages = [("clip_score", {"model": "curate-tiny", "pretrained": str(ckpt), "batch_size": 64,
                              "all_rows": True} | params)]
    if rank is not None:
        stages.append(("clip_rank", rank))
    return make_pipeline(*stages)


def test_scores_equal_direct_computation(pool: Path, tmp_path: Path, tiny_ckpt: Path):
    shard = pool / "00000.tar"
    s = run_pipeline(_pipe(tiny_ckpt, jpeg_draft=False), make_config(str(shard), tmp_path))
    assert s.ok
    t = pq.read_table(tmp_path / "clip_score" / "00000.parquet")
    idx = pq.read_table(tmp_path / "index" / "00000.parquet")
    clip = load_clip("curate-tiny", str(tiny_ckpt))
    scores = t.column("clip_score").to_pylist()
    imgs, caps, rows = [], [], []
    for i, smp in enumerate(iter_samples(shard)):
        if scores[i] is None:
            continue
        imgs.append(clip.preprocess(Image.open(io.BytesIO(smp.image())).convert("RGB")))
        caps.append(idx.column("caption")[i].as_py())
        rows.append(i)
    with torch.no_grad():
        fi = torch.nn.functional.normalize(clip.model.encode_image(torch.stack(imgs)), dim=-1)
        ft = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(caps)), dim=-1)
    direct = (fi * ft).sum(-1).numpy()
    ours = np.array([scores[i] for i in rows])
    assert len(rows) > 90
    assert np.abs(direct - ours).max() < 1e-3
    emb = embeddings(t, "image_emb")[rows]
    assert np.abs(emb - fi.numpy()).max() < 2e-3  # float16 storage
    meta = json.loads(pq.read_schema(tmp_path / "clip_score" / "00000.parquet").metadata[b"curate"])
    d = meta["describe"]
    assert d["model"] == "curate-tiny" and len(d["checkpoint_sha256"]) == 64 and "Normalize" in d["preprocess"]
    assert d["precision"] == "fp32"


def test_corrupt_image_mid_batch_is_reported_rest_scored(pool: Path, tmp_path: Path, tiny_ckpt: Path):
    s = run_pipeline(_pipe(tiny_ckpt), make_config(str(pool / "*.tar"), tmp_path))
    assert s.ok
    d = pl.read_parquet(tmp_path / "clip_score" / "*.parquet").join(
        pl.read_parquet(pool / "ground_truth.parquet"), on="uid")
    bad = d.filter(pl.col("label") == "corrupt_image")
    assert bad.height > 0 and (bad["reason_clip_score"] == "clip:undecodable").all()
    good = d.filter(pl.col("label") != "corrupt_image")
    assert good["clip_score"].null_count() == 0


def test_hanging_decode_is_a_reason_rest_scored(tmp_path: Path, tiny_ckpt: Path, hanging_format):
    members = []
    for i in range(5):
        img = HANG_MAGIC + b"\0" * 64 if i == 1 else jpeg_bytes((96, 64), (50 * i, 120, 30))
        members += [(f"{i:04d}.jpg", img), (f"{i:04d}.txt", f"caption {i}".encode())]
    shard = write_tar(tmp_path / "hang.tar", members)
    s = run_pipeline(_pipe(tiny_ckpt, decode_timeout_s=1.0), make_config(str(shard), tmp_path / "w"))
    assert s.ok
    t = pl.read_parquet(tmp_path / "w" / "clip_score" / "hang.parquet")
    assert t["reason_clip_score"].to_list() == [None, "clip:decode_timeout", None, None, None]
    assert t["clip_score"].null_count() == 1


@pytest.mark.slow
def test_batch_size_workers_and_order_do_not_change_selection(pool: Path, tmp_path: Path, tiny_ckpt: Path):
    rank = {"top_fraction": 0.3}
    inp = str(pool / "*.tar")
    a = run_pipeline(_pipe(tiny_ckpt, rank, batch_size=64), make_config(inp, tmp_path / "a"))
    b = run_pipeline(_pipe(tiny_ckpt, rank, batch_size=7), make_config(
        [str(p) for p in sorted(pool.glob("*.tar"), reverse=True)], tmp_path / "b", kind="local_cluster"))
    assert a.ok and b.ok
    sa = pl.read_parquet(tmp_path / "a" / "clip_score" / "*.parquet").sort("uid")
    sb = pl.read_parquet(tmp_path / "b" / "clip_score" / "*.parquet").sort("uid")
    diff = (sa["clip_score"] - sb["clip_score"]).abs().max()
    assert diff < 1e-5, diff
    tables_equal_dir(tmp_path / "a", tmp_path / "b", "clip_rank")
    kept = pl.read_parquet(tmp_path / "a" / "clip_rank" / "*.parquet")["keep_clip_rank"]
    n = kept.is_not_null().sum()
    assert kept.sum() == int(np.ceil(0.3 * n))


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ModelError, match="not found"):
        load_clip("curate-tiny", str(tmp_path / "nope.pt"))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# DALI is an optional extra: its cases run where it is installed (its CPU operators stand in for the GPU)
DECODERS = ["nvjpeg", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]


def _device_preprocess(kind: str, transform):
    from curate.models.dali_preprocess import DaliPreprocess
    from curate.models.device_preprocess import DevicePreprocess

    return (DaliPreprocess if kind == "dali" else DevicePreprocess).from_transform(transform)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("photos", [False, True])
def test_device_preprocess_matches_open_clip_transform(pool: Path, device: str, decoder: str, photos: bool):
    """nvJPEG/torch and DALI preprocessing against open_clip's PIL transform on the same JPEGs:
    the synthetic pool's, and real photos (COCO, where ../shared is present) whose resized long
    side and crop margin are odd."""
    shard = shared_data("shards/coco-val2017-mini-000000.tar") if photos else pool / "00000.tar"
    clip = load_clip("ViT-B-32", None)
    dp = _device_preprocess(decoder, clip.preprocess)
    assert dp is not None and dp.crop == 224
    jpegs = [s.image() for _, s in zip(range(40), iter_samples(shard))
             if s.image_ext() == "jpg" and s.image()[:2] == b"\xff\xd8"]
    ref, raw = [], []
    for b in jpegs:
        try:
            ref.append(clip.preprocess(Image.open(io.BytesIO(b)).convert("RGB")))
        except OSError:  # the pool's corrupt images: not this test's subject
            continue
        raw.append(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    assert len(raw) > 20
    ours, bad = dp.images(raw, device)
    assert bad == []
    ours = ours.cpu()
    ref_t = torch.stack(ref)
    assert ours.shape == ref_t.shape
    # one uint8 step is 1/255/std ~ 0.015 after normalisation; resampling differs by about that
    assert (ours - ref_t).abs().mean() < 0.01
    assert (ours - ref_t).abs().max() < 0.5


def test_device_preprocess_refuses_unknown_transforms():
    from torchvision import transforms as T

    from curate.models.device_preprocess import DevicePreprocess

    ok = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
                    T.Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))])
    assert DevicePreprocess.from_transform(ok) == DevicePreprocess(64, 64, (0.5,) * 3, (0.2,) * 3)
    for bad in (T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)]),
                T.Compose([T.RandomCrop(64), T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)]),
                T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)])):
        assert DevicePreprocess.from_transform(bad) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoder", DECODERS)
def test_device_decode_scores_match_and_broken_jpegs_are_reasons(tmp_path: Path, tiny_ckpt: Path, device: str,
                                                                 decoder: str):
    """JPEGs decoded on the device: scores match the PIL path, and JPEGs whose header parses but
    whose data is broken (truncated, garbage after the header) get a reason while the rest of
    the batch is scored. PNG and CMYK JPEG take the CPU path inside the same batch."""
    good = [jpeg_bytes((96 + 8 * i, 64 + 4 * i), (40 * i % 255, 120, 200 - 20 * i)) for i in range(10)]
    trunc = good[3][:40]  # header parses, data does not
    garbage = good[4][:300] + b"\x00" * 50
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 70), (10, 200, 30, 5)).save(cmyk, format="JPEG")
    png = io.BytesIO()
    Image.new("RGB", (90, 60), (200, 30, 30)).save(png, format="PNG")
    imgs = [("jpg", good[0]), ("jpg", good[1]), ("jpg", trunc), ("png", png.getvalue()), ("jpg", good[2]),
            ("jpg", garbage), ("jpg", cmyk.getvalue()), ("jpg", good[5]), ("jpg", good[6])]
    members = []
    for i, (ext, data) in enumerate(imgs):
        members += [(f"{i:04d}.{ext}", data), (f"{i:04d}.txt", f"a red shape number {i}".encode())]
    shard = write_tar(tmp_path / "mixed.tar", members)
    runs = {}
    for mode in (False, True):
        w = tmp_path / f"w{int(mode)}"
        s = run_pipeline(_pipe(tiny_ckpt, device_decode=mode, device_decoder=decoder, batch_size=4, jpeg_draft=False),
                         make_config(str(shard), w, device=device))
        assert s.ok
        runs[mode] = pl.read_parquet(w / "clip_score" / "mixed.parquet")
    reasons = runs[True]["reason_clip_score"].to_list()
    assert reasons[2] == "clip:undecodable" and reasons[5] == "clip:undecodable", reasons
    assert [r for i, r in enumerate(reasons) if i not in (2, 5)] == [None] * 7
    a, b = runs[False]["clip_score"].to_list(), runs[True]["clip_score"].to_list()
    for i in (0, 1, 3, 4, 6, 7, 8):
        assert abs(a[i] - b[i]) < 2e-2, (i, a[i], b[i])
    meta = json.loads(pq.read_schema(tmp_path / "w1" / "clip_score" / "mixed.parquet").metadata[b"curate"])
    assert meta["describe"]["decode"] == f"device ({'DALI' if decoder == 'dali' else 'nvJPEG'} for JPEG)"


def test_large_jpegs_stay_on_the_cpu_path(monkeypatch):
    from curate.models import clip_loader

    clip = load_clip("curate-tiny", None)
    ds = clip_loader.shard_images_dataset()("unused.tar", [0], clip.preprocess, draft=128, max_pixels=10**8, raw_jpeg=True)
    small, big = jpeg_bytes((64, 48)), jpeg_bytes((300, 200))
    monkeypatch.setattr(clip_loader.ShardImages, "RAW_JPEG_MAX_PIXELS", 100 * 100)
    assert ds._preprocess(small, "jpg").dtype == torch.uint8  # bytes for the device decoder
    out = ds._preprocess(big, "jpg")
    size = clip.model.visual.image_size
    assert out.dtype == torch.float32 and out.shape == (3, *size)  # decoded and preprocessed here


@pytest.mark.parametrize("bad", [set(), {0}, {3, 50, 51, 99}, set(range(100))])
def test_batch_decode_isolates_corrupt_items_by_halving(bad: set[int]):
    """A batch decoder that fails a whole batch for one corrupt item: every good item is decoded,
    every corrupt one reported, in far fewer calls than one per item."""
    from curate.models.device_preprocess import decode_bisecting

    calls = []

    def run(idx: list[int]) -> list[int]:
        calls.append(len(idx))
        if bad & set(idx):
            raise RuntimeError("corrupt JPEG in batch")
        return [i * 10 for i in idx]

    found, failed = decode_bisecting(100, run)
    assert failed == sorted(bad)
    assert found == {i: i * 10 for i in range(100) if i not in bad}
    if 0 < len(bad) <= 4:
        assert len(calls) <= 2 * len(bad) * 7 + 1
    assert decode_bisecting(0, run) == ({}, [])


def test_a_model_without_weights_is_seeded_the_same_in_every_process():
    """pretrained: null builds random weights: drawn from a fixed seed, so two runs (and the reference
    stage, which reloads the scorer it describes) score with the same model; the caller's RNG is untouched."""
    import torch

    from curate.models.clip import load_clip

    torch.manual_seed(123)
    expect_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_clip("curate-tiny", None).model.state_dict()
    assert torch.equal(torch.rand(3), expect_next)
    torch.manual_seed(999)
    b = load_clip("curate-tiny", None).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_clip("curate-tiny", None, seed=1).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_sample_scores_the_same_bits_in_any_shard_or_batch(tmp_path: Path, tiny_ckpt: Path):
    """One pool written as 1, 4 and 7 shards: every score and embedding is bit-identical (batches of
    one shape), not only close; the fast path (batch_invariant: false) is allowed rounding only."""
    from curate.tools.synth import synthesize

    got = {}
    for shards in (1, 4, 7):  # batches of 29: as 7 shards of 30, each shard ends in a batch of one sample
        synthesize(tmp_path / f"p{shards}", samples=210, shards=shards, seed=8)
        work = tmp_path / f"w{shards}"
        assert run_pipeline(_pipe(tiny_ckpt, batch_size=29), make_config(str(tmp_path / f"p{shards}" / "*.tar"), work)).ok
        got[shards] = pl.read_parquet(work / "clip_score" / "*.parquet").sort("uid")
    for shards in (4, 7):
        assert got[shards]["uid"].equals(got[1]["uid"])
        for col in ("clip_score", "image_emb", "text_emb"):
            assert got[shards][col].equals(got[1][col], null_equal=True), (shards, col)
    fast = tmp_path / "fast"
    assert run_pipeline(_pipe(tiny_ckpt, batch_size=29, batch_invariant=False),
                        make_config(str(tmp_path / "p7" / "*.tar"), fast)).ok
    f = pl.read_parquet(fast / "clip_score" / "*.parquet").sort("uid")
    assert (f["clip_score"] - got[1]["clip_score"]).abs().max() < 1e-5
