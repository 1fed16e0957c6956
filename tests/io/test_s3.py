"""Input shards, work dir and exports on object storage: a real S3-protocol server (moto's server
mode, the ``s3`` fixture) on 127.0.0.1.

The same pool read from s3:// and from local disk gives the same tables and the same exported
bytes; credentials come from the environment and are never saved; a missing URL is a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.core.config import ConfigError, RunConfig
from curate.report.export import ExportSpec, export
from curate.runner.pipeline import run_pipeline
from curate.engine import make_executor
from curate.io.shards import InputError, expand_input
from curate.io.storage import set_storage_options
from tests.conftest import BUCKET, make_config, make_pipeline


def _cfg(inputs, work: Path | str, endpoint: str) -> RunConfig:
    return make_config(inputs, work).model_copy(update={"storage_options": {"s3": {"endpoint_url": endpoint}}})


PIPE = make_pipeline(("text", {}), ("image", {"min_blur_var": 20.0}), ("dedup", {"exact": ["image"], "phash_radius": 4}))


def test_a_pool_on_s3_gives_the_local_tables_and_export(s3, tmp_path: Path):
    endpoint, pool = s3
    remote = run_pipeline(PIPE, _cfg(f"s3://{BUCKET}/pool/*.tar", tmp_path / "s3w", endpoint))
    local = run_pipeline(PIPE, make_config(str(pool / "*.tar"), tmp_path / "lw"))
    assert remote.ok and local.ok, remote.problems()
    for stage in ("index", "text", "image", "dedup"):
        a = pl.read_parquet(tmp_path / "s3w" / stage / "*.parquet")
        b = pl.read_parquet(tmp_path / "lw" / stage / "*.parquet")
        assert a.equals(b), stage
    def bytes_read(work: Path) -> float:
        stats = pl.read_parquet(work / "stats" / "index" / "*.parquet")
        return stats.filter(pl.col("metric") == "bytes_read")["value"].sum()

    assert bytes_read(tmp_path / "s3w") == bytes_read(tmp_path / "lw") > 0
    with make_executor(make_config("x", tmp_path)) as ex:
        export(tmp_path / "s3w", tmp_path / "s3out", ex, ExportSpec(shard_size=100))
        export(tmp_path / "lw", tmp_path / "lout", ex, ExportSpec(shard_size=100))
    tars = sorted(p.name for p in (tmp_path / "lout" / "shards").glob("*.tar"))
    assert tars and tars == sorted(p.name for p in (tmp_path / "s3out" / "shards").glob("*.tar"))
    for name in tars:
        assert (tmp_path / "s3out" / "shards" / name).read_bytes() == (tmp_path / "lout" / "shards" / name).read_bytes()


def test_globs_braces_and_list_files_work_for_urls(s3):
    endpoint, _ = s3
    set_storage_options({"s3": {"endpoint_url": endpoint}})
    assert [p.rsplit("/", 1)[1] for p in expand_input(f"s3://{BUCKET}/pool/{{00000..00001}}.tar")] == \
        ["00000.tar", "00001.tar"]
    assert len(expand_input(f"s3://{BUCKET}/pool/")) == 3
    assert [p.rsplit("/", 1)[1] for p in expand_input(f"s3://{BUCKET}/lists/two.txt")] == ["00000.tar", "00002.tar"]
    with pytest.raises(InputError, match="not found: s3://curate-test/pool/nope.tar"):
        expand_input(f"s3://{BUCKET}/pool/nope.tar")


def test_credentials_are_never_saved(s3, tmp_path: Path):
    endpoint, _ = s3
    cfg = make_config(f"s3://{BUCKET}/pool/00000.tar", tmp_path / "w").model_copy(update={"storage_options": {
        "s3": {"endpoint_url": endpoint, "key": "testing", "secret": "testing-secret"}}})
    assert run_pipeline(make_pipeline(("text", {})), cfg).ok
    saved = next((tmp_path / "w" / "runs").glob("*/config.yaml"))
    assert "testing-secret" not in saved.read_text()
    assert yaml.safe_load(saved.read_text())["storage_options"]["s3"] == {
        "endpoint_url": endpoint, "key": "***", "secret": "***"}


def _full_pipe(ckpt: Path):
    """The demo's stage kinds: map filters, a CLIP scorer, and the three global stages."""
    return make_pipeline(
        ("text", {"min_words": 3}),
        ("image", {"min_side": 200, "min_blur_var": 20.0}),
        ("clip_score", {"model": "curate-tiny", "pretrained": str(ckpt), "batch_size": 64}),
        ("clip_rank", {"top_fraction": 0.8}),
        ("dedup", {"exact": ["image"], "phash_radius": 4, "keep": "clip_score"}),
        ("balance", {"vocabulary": "imagenet21k", "case_sensitive": False, "target_size": 150, "unmatched": "keep"}))


@pytest.mark.slow
def test_input_work_dir_and_export_all_on_s3_equal_the_local_run(s3, tmp_path: Path, tiny_ckpt: Path):
    """Nothing local but the model: pool, work dir and export on s3://. Every stage table, the
    decisions, the funnel and the exported bytes equal the local run's; a second run recomputes
    nothing; a second run while one holds the work dir is refused; stats and the report read it."""
    import s3fs

    from curate.cli import main
    from curate.report.decisions import decisions
    from curate.report.stats import funnel
    from curate.io.parquet import read_frame

    endpoint, pool = s3
    pipe = _full_pipe(tiny_ckpt)
    work = f"s3://{BUCKET}/runs/w1"
    remote = run_pipeline(pipe, _cfg(f"s3://{BUCKET}/pool/*.tar", work, endpoint))
    local = run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "lw"))
    assert remote.ok and local.ok, remote.problems()
    assert remote.workdir == work
    set_storage_options({"s3": {"endpoint_url": endpoint}})  # the local run cleared them
    for stage in ("index", "text", "image", "clip_score", "clip_rank", "dedup", "balance"):
        assert read_frame(f"{work}/{stage}/*.parquet").equals(pl.read_parquet(tmp_path / "lw" / stage / "*.parquet")), stage
    d_remote, d_local = decisions(work), decisions(tmp_path / "lw")
    assert d_remote.equals(d_local) and 0 < d_remote["kept"].sum() < d_remote.height
    drop_seconds = [{k: v for k, v in r.items() if k != "seconds"} for r in funnel(work)]
    assert drop_seconds == [{k: v for k, v in r.items() if k != "seconds"} for r in funnel(tmp_path / "lw")]

    again = run_pipeline(pipe, _cfg(f"s3://{BUCKET}/pool/*.tar", work, endpoint))
    assert again.ok and all(r.done == 0 for r in again.stages), [(r.stage_id, r.done) for r in again.stages]

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    assert not fs.exists(f"{BUCKET}/runs/w1/.curate-run.lease")  # released at the end of each run
    fs.pipe(f"{BUCKET}/runs/w1/.curate-run.lease", json.dumps(
        {"run_id": "other", "host": "node-7", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}).encode())
    with pytest.raises(ConfigError, match="in use by run other on node-7"):
        run_pipeline(pipe, _cfg(f"s3://{BUCKET}/pool/*.tar", work, endpoint))
    fs.rm(f"{BUCKET}/runs/w1/.curate-run.lease")

    with make_executor(make_config(str(pool / "*.tar"), tmp_path / "lw")) as ex:
        m = export(work, f"s3://{BUCKET}/exports/from-s3", ex, ExportSpec(shard_size=50))
        lm = export(tmp_path / "lw", tmp_path / "lout", ex, ExportSpec(shard_size=50))
    assert m["samples_kept"] == lm["samples_kept"] > 0 and m["output_shards"] == lm["output_shards"]
    for name in ("uids.npy", "shards/00000.tar", "metadata/00001.parquet"):
        assert fs.cat(f"{BUCKET}/exports/from-s3/{name}") == (tmp_path / "lout" / name).read_bytes(), name

    cfg_file = tmp_path / "s3.yaml"
    cfg_file.write_text(yaml.safe_dump({"storage_options": {"s3": {"endpoint_url": endpoint}}}))
    assert main(["stats", work, "--config", str(cfg_file), "--json"]) == 0
    assert main(["report", work, "--config", str(cfg_file), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").stat().st_size > 0
    assert not fs.exists(f"{BUCKET}/runs/w1/report")


def test_work_dir_mistakes_on_s3_are_named_before_any_work(s3, tmp_path: Path):
    endpoint, _ = s3
    with pytest.raises(ConfigError, match="work dir s3://no-such-bucket/w is not writable"):
        run_pipeline(make_pipeline(("text", {})), _cfg(f"s3://{BUCKET}/pool/*.tar", "s3://no-such-bucket/w", endpoint))
    with pytest.raises(ConfigError, match="storage_options.s3: .*retries"):
        run_pipeline(make_pipeline(("text", {})), _cfg(f"s3://{BUCKET}/pool/*.tar", f"s3://{BUCKET}/w", endpoint)
                     .model_copy(update={"storage_options": {"s3": {"endpoint_url": endpoint, "retries": 1}}}))
    set_storage_options({"s3": {"endpoint_url": endpoint}})
    with pytest.raises(ConfigError, match="work dir not found"):
        from curate.report.decisions import run_record

        run_record(f"s3://{BUCKET}/never-written")


def test_export_to_s3_is_complete_or_absent_and_never_over_foreign_objects(s3, tmp_path: Path):
    """Export to s3://: the same files as a local export; the marker is written last; an earlier
    export is replaced only with overwrite; a prefix holding other objects is refused."""
    import s3fs

    endpoint, pool = s3
    work = tmp_path / "w"
    assert run_pipeline(PIPE, _cfg(str(pool / "*.tar"), work, endpoint)).ok
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    url = f"s3://{BUCKET}/exports/a"
    with make_executor(make_config(str(pool / "*.tar"), work)) as ex:
        m = export(work, url, ex, ExportSpec(shard_size=50))
        local = export(work, tmp_path / "local", ex, ExportSpec(shard_size=50))
    assert m["samples_kept"] == local["samples_kept"] > 0
    remote_files = sorted(p.split("/exports/a/", 1)[1] for p in fs.find(f"{BUCKET}/exports/a"))
    local_files = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert remote_files == local_files and ".curate-export.json" in remote_files
    for name in ("uids.npy", "shards/00000.tar", "manifest.json"):
        assert fs.cat(f"{BUCKET}/exports/a/{name}") == (tmp_path / "local" / name).read_bytes(), name
    with make_executor(make_config(str(pool / "*.tar"), work)) as ex:
        with pytest.raises(Exception, match="earlier export"):
            export(work, url, ex, ExportSpec(shard_size=50))
        m2 = export(work, url, ex, ExportSpec(shard_size=100, overwrite=True))
        assert fs.exists(f"{BUCKET}/exports/a/.curate-export.json")
        tars = [p for p in fs.ls(f"{BUCKET}/exports/a/shards") if p.endswith(".tar")]
        assert len(tars) == m2["output_shards"] < m["output_shards"]  # no stale shard of the earlier export
        fs.pipe(f"{BUCKET}/exports/foreign/data.bin", b"someone else's")
        with pytest.raises(Exception, match="did not write"):
            export(work, f"s3://{BUCKET}/exports/foreign", ex, ExportSpec(overwrite=True))
    assert fs.cat(f"{BUCKET}/exports/foreign/data.bin") == b"someone else's"


def test_a_model_cache_on_s3_is_copied_to_each_machine_once(s3, tmp_path: Path, tiny_ckpt: Path, monkeypatch):
    """model_cache: s3://... holds the checkpoint; the run copies it to the machine's mirror and
    scores exactly as with the local file; a missing checkpoint is named in preflight with the URL;
    huggingface_hub's layout is uploaded with its links followed and without blobs/."""
    import s3fs

    from curate.models import remote_cache

    endpoint, pool = s3
    monkeypatch.setenv("CURATE_MODEL_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setattr(remote_cache, "_MIRRORS", {})
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.put_file(str(tiny_ckpt), f"{BUCKET}/models/tiny.pt")

    def pipe(pretrained: str):
        return make_pipeline(("clip_score", {"model": "curate-tiny", "pretrained": pretrained, "batch_size": 64}))

    cfg = _cfg(str(pool / "00000.tar"), tmp_path / "w", endpoint).model_copy(
        update={"model_cache": f"s3://{BUCKET}/models"})
    assert run_pipeline(pipe("tiny.pt"), cfg).ok
    assert run_pipeline(pipe(str(tiny_ckpt)), make_config(str(pool / "00000.tar"), tmp_path / "local")).ok
    assert pl.read_parquet(tmp_path / "w" / "clip_score" / "*.parquet").equals(
        pl.read_parquet(tmp_path / "local" / "clip_score" / "*.parquet"))
    copies = list((tmp_path / "mirror").rglob("tiny.pt"))
    assert len(copies) == 1 and copies[0].read_bytes() == tiny_ckpt.read_bytes()

    with pytest.raises(ConfigError, match=f"checkpoint 'other.pt' not found \\(model_cache: s3://{BUCKET}/models\\)"):
        run_pipeline(pipe("other.pt"), cfg.model_copy(update={"workdir": str(tmp_path / "w2")}))
    assert not (tmp_path / "w2" / "clip_score").exists()

    hub = tmp_path / "hub" / "models--org--m"
    (hub / "blobs").mkdir(parents=True)
    (hub / "blobs" / "abc123").write_bytes(b"weights")
    (hub / "snapshots" / "rev1").mkdir(parents=True)
    (hub / "snapshots" / "rev1" / "open_clip_model.safetensors").symlink_to(hub / "blobs" / "abc123")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("rev1")
    url = f"s3://{BUCKET}/hubcache"
    assert remote_cache.upload_model_cache(tmp_path / "hub", url) == 2
    assert remote_cache.upload_model_cache(tmp_path / "hub", url) == 0  # already there
    assert sorted(k.split("/hubcache/", 1)[1] for k in fs.find(f"{BUCKET}/hubcache")) == [
        "models--org--m/refs/main", "models--org--m/snapshots/rev1/open_clip_model.safetensors"]
    local = Path(remote_cache.local_model_cache(url))
    assert (local / "models--org--m" / "snapshots" / "rev1" / "open_clip_model.safetensors").read_bytes() == b"weights"
