"""Input shards on object storage: a real S3-protocol server (moto's server mode) on 127.0.0.1.

The same pool read from s3:// and from local disk gives the same tables and the same exported
bytes; credentials come from the environment and are never saved; a missing URL is a clear error.
"""
from __future__ import annotations

import socket
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.core.config import ConfigError, RunConfig
from curate.core.export import ExportSpec, export
from curate.core.pipeline import run_pipeline
from curate.engine import make_executor
from curate.io.shards import InputError, expand_input
from curate.io.storage import set_storage_options
from curate.tools.synth import synthesize
from tests.conftest import make_config, make_pipeline

BUCKET = "curate-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, local pool folder): a moto S3 server holding the pool under s3://curate-test/pool/."""
    from moto.server import ThreadedMotoServer
    import s3fs

    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    pool = tmp_path_factory.mktemp("s3pool")
    synthesize(pool, samples=240, shards=3, seed=5)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    for p in sorted(pool.glob("*.tar")):
        fs.put(str(p), f"{BUCKET}/pool/{p.name}")
    fs.pipe(f"{BUCKET}/lists/two.txt", b"# two shards\n../pool/00000.tar\ns3://curate-test/pool/00002.tar\n")
    yield endpoint, pool
    server.stop()
    set_storage_options({})
    mp.undo()


def _cfg(inputs, work: Path, endpoint: str) -> RunConfig:
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


def test_a_url_work_dir_is_refused_before_any_work(tmp_path: Path):
    with pytest.raises(ConfigError, match="a URL work dir is not supported yet"):
        run_pipeline(make_pipeline(("text", {})), make_config("x.tar", tmp_path).model_copy(
            update={"workdir": "s3://bucket/work"}))


def test_connections_reset_mid_read_are_retried(s3, tmp_path: Path):
    """Two ranged GETs cut mid-response by a proxy: the reads are retried and the tables equal the
    local run's; nothing half-read is committed."""
    from tests.io.flaky_proxy import FlakyProxy

    endpoint, pool = s3
    proxy = FlakyProxy(int(endpoint.rsplit(":", 1)[1]), cut={2, 4})
    try:
        pipe = make_pipeline(("text", {}), ("image", {"min_blur_var": 20.0}))
        remote = run_pipeline(pipe, _cfg(f"s3://{BUCKET}/pool/*.tar", tmp_path / "s3w", f"http://127.0.0.1:{proxy.port}"))
    finally:
        proxy.close()
    assert proxy.cuts == 2  # the faults really happened
    assert remote.ok, remote.problems()
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "lw")).ok
    for stage in ("index", "text", "image"):
        assert pl.read_parquet(tmp_path / "s3w" / stage / "*.parquet").equals(
            pl.read_parquet(tmp_path / "lw" / stage / "*.parquet")), stage


def test_throttled_requests_are_retried(s3, tmp_path: Path):
    """503 SlowDown on several connections (S3's throttling answer): retried with backoff, the
    tables equal the local run's."""
    from tests.io.flaky_proxy import FlakyProxy

    endpoint, pool = s3
    proxy = FlakyProxy(int(endpoint.rsplit(":", 1)[1]), busy={1, 3, 4, 7})
    try:
        pipe = make_pipeline(("text", {}))
        remote = run_pipeline(pipe, _cfg(f"s3://{BUCKET}/pool/*.tar", tmp_path / "s3w", f"http://127.0.0.1:{proxy.port}"))
    finally:
        proxy.close()
    assert proxy.throttled == 4
    assert remote.ok, remote.problems()
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), tmp_path / "lw")).ok
    for stage in ("index", "text"):
        assert pl.read_parquet(tmp_path / "s3w" / stage / "*.parquet").equals(
            pl.read_parquet(tmp_path / "lw" / stage / "*.parquet")), stage


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
