from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from curate.engine import make_executor
from curate.report.export import ExportSpec, export
from curate.io.shards import iter_samples
from curate.runner.pipeline import run_pipeline
from curate.report.html import write_report
from tests.conftest import make_config, make_pipeline

PIPE = make_pipeline(("text", {}), ("image", {"max_dominant_share": 0.97, "min_blur_var": 20.0}))


@pytest.fixture(scope="module")
def curated(pool: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work")
    assert run_pipeline(PIPE, make_config(str(pool / "*.tar"), work)).ok
    return work


def _export(work: Path, out: Path, kind: str = "inprocess", **spec) -> dict:
    cfg = make_config("unused", out.parent, kind=kind)
    with make_executor(cfg) as ex:
        return export(work, out, ex, ExportSpec(**({"shard_size": 70} | spec)))


def _tar_samples(out: Path) -> dict[str, dict]:
    got: dict[str, dict] = {}
    for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False):
        meta = json.loads(s["json"])
        assert meta["uid"] not in got
        got[meta["uid"]] = s
    return got


def test_round_trip(curated: Path, pool: Path, tmp_path: Path):
    out = tmp_path / "out"
    m = _export(curated, out, hf_parquet=True)
    d = pl.read_parquet(out / "pool" / "*.parquet")
    kept = set(d.filter(pl.col("kept"))["uid"])
    assert 0 < len(kept) < d.height == 400 and m["samples_kept"] == len(kept)
    meta = pl.read_parquet(out / "metadata" / "*.parquet")
    assert meta["uid"].n_unique() == meta.height and set(meta["uid"]) == kept
    assert {"caption", "url", "lang", "blur_var", "sha256", "width"} <= set(meta.columns)
    assert not any(c.startswith(("keep_", "reason_")) for c in meta.columns)
    dropped = d.filter(~pl.col("kept"))
    assert dropped["dropped_by"].null_count() == 0 and dropped["reason"].null_count() == 0
    arr = np.load(out / "uids.npy")
    pairs = arr.tolist()
    assert arr.dtype == np.dtype("u8,u8") and pairs == sorted(pairs)
    assert {f"{a:016x}{b:016x}" for a, b in pairs} == kept
    tars = _tar_samples(out)
    assert set(tars) == kept
    originals = {json.loads(s.members["json"])["uid"]: s.image() for p in sorted(pool.glob("*.tar"))
                 for s in iter_samples(p)}
    for uid, s in tars.items():
        assert s["jpg"] == originals[uid]  # bytes copied, not re-encoded
        assert s["txt"].decode() == meta.filter(pl.col("uid") == uid)["caption"][0]
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(kept) and max(sizes.values()) == 70
    hf = pl.read_parquet(out / "hf" / "*.parquet")
    assert hf.height == len(kept) and set(hf["uid"]) == kept
    row = hf.row(0, named=True)
    assert row["image"]["bytes"] == originals[row["uid"]]


def test_one_or_two_workers_give_identical_shards(curated: Path, tmp_path: Path):
    _export(curated, tmp_path / "a", shuffle_seed=3)
    _export(curated, tmp_path / "b", kind="local_cluster", shuffle_seed=3)
    fa = sorted(p.name for p in (tmp_path / "a" / "shards").iterdir())
    assert fa == sorted(p.name for p in (tmp_path / "b" / "shards").iterdir())
    for name in fa:
        assert (tmp_path / "a" / "shards" / name).read_bytes() == (tmp_path / "b" / "shards" / name).read_bytes()
    assert (tmp_path / "a" / "uids.npy").read_bytes() == (tmp_path / "b" / "uids.npy").read_bytes()


def test_open_clip_training_loader_reads_every_kept_sample_once(curated: Path, tmp_path: Path):
    from open_clip_train.data import get_wds_dataset

    out = tmp_path / "out"
    m = _export(curated, out)
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))

    def fingerprint(im: Image.Image):
        import torch

        return torch.tensor(list(hashlib.sha256(im.tobytes()).digest()[:8]), dtype=torch.uint8)

    args = SimpleNamespace(val_data="::".join(shards), val_num_samples=m["samples_kept"], batch_size=16,
                           workers=0, world_size=1, seed=0, train_data_upsampling_factors=None)
    data = get_wds_dataset(args, fingerprint, is_train=False, tokenizer=lambda t: [t])
    seen = Counter()
    for imgs, _texts in data.dataloader:
        seen.update(bytes(x.tolist()) for x in imgs)
    expect = Counter()
    for p in shards:
        for s in iter_samples(p):
            im = Image.open(io.BytesIO(s.image())).convert("RGB")
            expect[hashlib.sha256(im.tobytes()).digest()[:8]] += 1
    assert seen == expect and sum(seen.values()) == m["samples_kept"]


def test_everything_dropped_gives_valid_empty_outputs(pool: Path, tmp_path: Path):
    work = tmp_path / "w"
    pipe = make_pipeline(("text", {"languages": ["xx"]}))
    assert run_pipeline(pipe, make_config(str(pool / "00000.tar"), work)).ok
    m = _export(work, tmp_path / "out")
    assert m["samples_kept"] == 0 and m["output_shards"] == 0
    assert np.load(tmp_path / "out" / "uids.npy").shape == (0,)
    assert pl.read_parquet(tmp_path / "out" / "metadata" / "*.parquet").height == 0


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_report_renders_and_references_existing_images(curated: Path):
    index = write_report(curated)
    p = _Refs()
    p.feed(index.read_text())
    assert len(p.srcs) >= 5
    for src in p.srcs:
        assert (index.parent / src).is_file(), src
    text = index.read_text()
    assert "image:min_side" in text and "lang:" in text
    assert re.search(r"<td>400</td>", text)
