"""The partitioned dedup combine (exact and pHash keys split by hash over tasks) gives the one-task
combine's groups, kept samples and reasons; its parts resume; its mistakes are named before work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curate.algorithms.phash import key_parts, near_pairs, pairs_within_key, search_tables, unique_pairs
from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from curate.stages.dedup import DedupStage
from tests.conftest import make_config, make_pipeline, shared_data, write_tar
from tests.stages.test_dedup import IMAGE, _jpeg

COLS = ["uid", "dup_group", "dup_of", "keep_dedup", "reason_dedup"]


def _planted(n: int, copies: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64).view(np.uint64)
    src = rng.choice(n - copies, size=copies, replace=False)
    for i, s in enumerate(src):
        flip = np.uint64(0)
        for b in rng.choice(64, size=int(rng.integers(0, 5)), replace=False):
            flip |= np.uint64(1) << np.uint64(int(b))
        h[n - copies + i] = h[s] ^ flip
    return h.view(np.int64)


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_partitioned_pairs_equal_one_search(parts: int):
    h = _planted(20_000, 2_000, seed=parts)
    ref = near_pairs(h, 4)
    tables = search_tables(4, len(h))
    po = key_parts(h, tables, parts)
    found = []
    for k in range(parts):  # each part holds, per table, only the rows whose key is in it
        for t, mask in enumerate(tables):
            rows = np.flatnonzero(po[:, t] == k)
            assert len(rows) < len(h)
            pr = pairs_within_key(h[rows], mask, 4)
            if len(pr):
                found.append(np.sort(rows[pr], axis=1))
    assert len(ref) >= 2_000 and np.array_equal(unique_pairs(np.concatenate(found)), ref)


def _dedup_tables(work: Path) -> pl.DataFrame:
    return pl.read_parquet(work / "dedup" / "*.parquet", columns=COLS).sort("uid")


def _both_ways(pool: str, tmp_path: Path, stages: list, dedup: dict, parts: int = 3) -> pl.DataFrame:
    one = run_pipeline(make_pipeline(*stages, ("dedup", dedup | {"partitions": 1})), make_config(pool, tmp_path / "one"))
    many = run_pipeline(make_pipeline(*stages, ("dedup", dedup | {"partitions": parts})),
                        make_config(pool, tmp_path / "many", kind="local_cluster"))
    for s in (one, many):  # damaged shards are named (bad_shards); no stage may fail
        assert not any(r.failed or r.blocked for r in s.stages), s.problems()
    a, b = _dedup_tables(tmp_path / "one"), _dedup_tables(tmp_path / "many")
    assert a.equals(b)
    done = json.loads((tmp_path / "many" / "global" / "dedup.done.json").read_text())
    assert done["summary"]["partitions"] == parts
    assert not list((tmp_path / "many" / "global").glob("dedup.parts-*"))  # parts removed after the marker
    return a


@pytest.mark.slow
def test_partitioned_combine_equals_one_task_on_the_synthetic_pool(pool: Path, tmp_path: Path, tiny_ckpt: Path):
    """Exact (image and url keys) and pHash groups, the kept sample chosen by CLIP score."""
    clip = ("clip_score", {"model": "curate-tiny", "pretrained": str(tiny_ckpt), "batch_size": 64})
    d = _both_ways(str(pool / "*.tar"), tmp_path, [IMAGE, clip],
                   {"exact": ["image", "url"], "phash_radius": 4, "keep": "clip_score"})
    reasons = d["reason_dedup"].value_counts()
    assert set(reasons["reason_dedup"].drop_nulls()) == {"dedup:exact", "dedup:phash"}


@pytest.mark.slow
def test_partitioned_combine_on_broken_samples(tmp_path: Path):
    """Empty, truncated and missing images and captions: the same decisions either way."""
    good = _jpeg(Image.new("RGB", (300, 300), (200, 40, 40)))
    other = _jpeg(Image.new("RGB", (300, 300), (20, 40, 200)))
    shard = write_tar(tmp_path / "broken.tar", [
        ("a.jpg", good), ("a.txt", b"a red square"), ("b.jpg", good), ("b.txt", b"a red square"),
        ("c.jpg", b""), ("c.txt", b"zero byte image"), ("d.jpg", good[:300]), ("d.txt", b"truncated"),
        ("e.txt", b"no image at all"), ("f.jpg", good), ("f.txt", b"   "), ("g.jpg", other), ("g.txt", b"")])
    d = _both_ways(str(shard), tmp_path, [("image", {"all_rows": True, "min_side": None})],
                   {"all_rows": True, "exact": ["image", "caption"], "phash_radius": None, "keep": "smallest_uid"},
                   parts=4)
    # a, b and f share their bytes; f and g have blank captions, which are no caption key
    assert d["keep_dedup"].null_count() == 0 and (~d["keep_dedup"]).sum() == 2


def test_partitioned_combine_on_fuzzed_real_shards(tmp_path: Path):
    src = shared_data("shards/coco-val2017-mini-000000.tar").read_bytes()[:3_000_000]
    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(3):
        data = bytearray(src)
        for pos in rng.integers(0, len(data), size=100):
            data[pos] ^= int(rng.integers(1, 256))
        (inputs / f"fuzz{k}.tar").write_bytes(bytes(data[: int(rng.integers(len(data) // 2, len(data)))]))
    (inputs / "copy.tar").write_bytes(src[:1_000_000])  # whole copies of the first samples
    d = _both_ways(str(inputs / "*.tar"), tmp_path, [("image", {"all_rows": True})],
                   {"all_rows": True, "exact": ["image"], "phash_radius": 4, "keep": "smallest_uid"})
    assert (~d["keep_dedup"]).sum() > 0


def test_a_stopped_combine_keeps_its_parts(pool: Path, tmp_path: Path, monkeypatch):
    """A combine that fails after its parts leaves them; the rerun reads them, computes no part
    again, and ends as an uninterrupted run."""
    pipe = make_pipeline(IMAGE, ("dedup", {"partitions": 3, "keep": "smallest_uid"}))
    cfg = make_config(str(pool / "*.tar"), tmp_path / "w")

    def stop(self, ctx, parts):
        raise RuntimeError("stopped")

    with monkeypatch.context() as m:
        m.setattr(DedupStage, "_combine_from_parts", stop)
        assert not run_pipeline(pipe, cfg).ok
    parts = sorted((tmp_path / "w" / "global").glob("dedup.parts-*/*.parquet"))
    assert len(parts) == 3
    calls = []
    real = DedupStage.combine_part
    monkeypatch.setattr(DedupStage, "combine_part", lambda self, *a: calls.append(a) or real(self, *a))
    assert run_pipeline(pipe, cfg).ok
    assert calls == []  # every part was read back, none recomputed
    assert run_pipeline(make_pipeline(IMAGE, ("dedup", {"partitions": 1, "keep": "smallest_uid"})),
                        make_config(str(pool / "*.tar"), tmp_path / "ref")).ok
    assert _dedup_tables(tmp_path / "w").equals(_dedup_tables(tmp_path / "ref"))


def test_partitions_with_a_whole_pool_kind_is_named_before_work(pool: Path, tmp_path: Path):
    pipe = make_pipeline(IMAGE, ("dedup", {"partitions": 2, "semantic_eps": 0.05}))
    with pytest.raises(ConfigError, match="partitions > 1 works with the exact and pHash kinds only"):
        run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "w"))
    assert not (tmp_path / "w" / "index").exists()
