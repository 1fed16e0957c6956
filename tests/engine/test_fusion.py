"""Fused map stages (one task per shard, the tar read once) write what unfused stages write."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.runner.pipeline import run_pipeline
from curate.stages.image import ImageStage
from tests.conftest import make_config, make_pipeline, tables_equal_dir

MAP_STAGES = ("index", "text", "image", "clip_score")


def _pipe(ckpt: Path):
    return make_pipeline(
        ("text", {"min_words": 3}),
        ("image", {"min_side": 200, "min_blur_var": 20.0, "max_dominant_share": 0.97}),
        ("clip_score", {"model": "curate-tiny", "pretrained": str(ckpt), "batch_size": 64}),
        ("clip_rank", {"top_fraction": 0.5}),
        ("dedup", {"exact": ["image"], "phash_radius": 4, "keep": "clip_score"}))


def _stats(work: Path) -> pl.DataFrame:
    return pl.read_parquet(work / "stats" / "**" / "*.parquet")


def _bytes_read(work: Path, stages=MAP_STAGES) -> float:
    s = _stats(work)
    return float(s.filter(pl.col("stage").is_in(stages) & (pl.col("metric") == "bytes_read"))["value"].sum())


def _problems(summary) -> list[str]:
    return sorted(summary.problems())


@pytest.mark.slow
def test_fused_equals_unfused_and_reads_each_tar_once(pool: Path, tmp_path: Path, tiny_ckpt: Path):
    inp = str(pool / "*.tar")
    a = run_pipeline(_pipe(tiny_ckpt), make_config(inp, tmp_path / "unfused", fuse=False))
    b = run_pipeline(_pipe(tiny_ckpt), make_config(inp, tmp_path / "fused"))
    assert a.ok and b.ok, (a.problems(), b.problems())
    for sub in (*MAP_STAGES, "clip_rank", "dedup"):
        tables_equal_dir(tmp_path / "unfused", tmp_path / "fused", sub)
    # every stage reports as if it had run alone
    assert [(r.stage_id, r.done, r.skipped) for r in a.stages] == [(r.stage_id, r.done, r.skipped) for r in b.stages]
    index_bytes = _bytes_read(tmp_path / "fused", ("index",))
    assert index_bytes > 0
    assert _bytes_read(tmp_path / "fused") == index_bytes  # the later stages read nothing more
    assert _bytes_read(tmp_path / "unfused") > 1.5 * index_bytes  # the image stage reads again
    # a finished fused run is resumed without recomputing anything
    c = run_pipeline(_pipe(tiny_ckpt), make_config(inp, tmp_path / "fused"))
    assert c.ok and all(r.done == 0 for r in c.stages)


def test_fused_equals_unfused_on_damaged_shards(pool: Path, tmp_path: Path):
    """Byte flips and truncation: the same rows, reasons and named damaged shards either way."""
    rng = np.random.default_rng(3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k, src in enumerate(sorted(pool.glob("*.tar"))):
        data = bytearray(src.read_bytes())
        for pos in rng.integers(0, len(data), size=40 * k):
            data[pos] ^= int(rng.integers(1, 256))
        if k >= 2:
            data = data[: int(rng.integers(len(data) // 3, len(data)))]
        (inputs / src.name).write_bytes(bytes(data))
    pipe = make_pipeline(("text", {"all_rows": True}),
                         ("image", {"all_rows": True, "min_blur_var": 20.0, "max_dominant_share": 0.97}))
    inp = str(inputs / "*.tar")
    a = run_pipeline(pipe, make_config(inp, tmp_path / "unfused", fuse=False))
    b = run_pipeline(pipe, make_config(inp, tmp_path / "fused"))
    assert _problems(a) == _problems(b) and any("damaged" in p or "truncated" in p for p in _problems(b)), _problems(b)
    for sub in ("index", "text", "image"):
        tables_equal_dir(tmp_path / "unfused", tmp_path / "fused", sub)


def test_a_stage_failing_on_one_shard_keeps_the_others_and_resumes(pool: Path, tmp_path: Path, monkeypatch):
    """A stage that raises on one shard: the stages before it keep that shard's outputs, the
    stages after it are blocked there, every other shard finishes; the rerun computes only what is
    missing."""
    real = ImageStage.measure

    def broken(self, ctx, rows):
        if ctx.shard == "00001":
            raise OSError("disk went away")
        return real(self, ctx, rows)

    monkeypatch.setattr(ImageStage, "measure", broken)
    pipe = make_pipeline(("text", {}), ("image", {"min_blur_var": 20.0}), ("url_domain", {}))
    cfg = make_config(str(pool / "*.tar"), tmp_path / "w")
    s = run_pipeline(pipe, cfg)
    by = {r.stage_id: r for r in s.stages}
    assert by["index"].done == by["text"].done == 4
    assert list(by["image"].failed) == ["00001"] and "stage image" in by["image"].failed["00001"]
    assert "disk went away" in by["image"].failed["00001"]
    assert by["image"].done == 3 and by["url_domain"].blocked == ["00001"] and by["url_domain"].done == 3
    assert (tmp_path / "w" / "text" / "00001.parquet").exists()
    assert not (tmp_path / "w" / "image" / "00001.parquet").exists()

    monkeypatch.setattr(ImageStage, "measure", real)
    s2 = run_pipeline(pipe, cfg)
    by = {r.stage_id: r for r in s2.stages}
    assert s2.ok and by["text"].skipped == 4 and by["text"].done == 0
    assert by["image"].done == 1 and by["url_domain"].done == 1
    ref = run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "ref", fuse=False))
    assert ref.ok
    for sub in ("index", "text", "image", "url_domain"):
        tables_equal_dir(tmp_path / "ref", tmp_path / "w", sub)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_groups_split_where_resources_differ(device: str, tiny_ckpt: Path):
    """On a GPU the CLIP stage is its own task (the CPU stages stay on CPU workers); on a CPU machine
    every consecutive map stage is one task; global stages and fuse: false stand alone."""
    from curate.runner.pipeline import _task_groups
    from curate.runner import execute
    from curate.contract.base import RunInfo
    from curate.runner.registry import build_stages, spec_of

    stages = build_stages(_pipe(tiny_ckpt))
    run = RunInfo(run_id="r", workdir="w", device=device)
    tasks = [(st, execute.StageTask(spec=spec_of(st), stage_id=st.stage_id, upstream=(), fingerprint=str(k), run=run))
             for k, st in enumerate(stages)]
    groups = [[st.stage_id for st, _ in g] for g in _task_groups(tasks, fuse=True)]
    maps = [["index", "text", "image", "clip_score"]] if device == "cpu" else [["index", "text", "image"], ["clip_score"]]
    assert groups == maps + [["clip_rank"], ["dedup"]]
    assert [[st.stage_id for st, _ in g] for g in _task_groups(tasks, fuse=False)] == [[t] for t in MAP_STAGES] + [
        ["clip_rank"], ["dedup"]]
