"""Faults of remote storage: a TCP proxy in front of the S3 server (the ``s3`` fixture) cuts reads
mid-response, answers 503 SlowDown, and resets the connections of uploads. Retried faults leave the
run's tables equal to a local run's; a run whose uploads keep failing commits nothing partial and
the rerun resumes from what it did commit."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from curate.runner.pipeline import run_pipeline
from curate.io.parquet import read_frame
from curate.io.storage import set_storage_options
from tests.conftest import BUCKET, make_config, make_pipeline
from tests.io.flaky_proxy import FlakyProxy

PIPE = make_pipeline(("text", {}), ("image", {"min_blur_var": 20.0}), ("dedup", {"exact": ["image"]}))
STAGES = ("index", "text", "image", "dedup")


def _cfg(work: str | Path, endpoint: str, **s3_options):
    return make_config(f"s3://{BUCKET}/pool/*.tar", work).model_copy(
        update={"storage_options": {"s3": {"endpoint_url": endpoint, **s3_options}}})


def _compare(work: str | Path, endpoint: str, pool: Path, local: Path) -> tuple[int, int]:
    """(samples lost, stage tables differing) of ``work`` against a local run of the same pool."""
    if not (local / "index").exists():
        assert run_pipeline(PIPE, make_config(str(pool / "*.tar"), local)).ok
    set_storage_options({"s3": {"endpoint_url": endpoint}})
    ours = {s: read_frame(f"{work}/{s}/*.parquet") for s in STAGES}
    theirs = {s: pl.read_parquet(local / s / "*.parquet") for s in STAGES}
    lost = len(set(theirs["index"]["uid"]) - set(ours["index"]["uid"]))
    return lost, sum(not ours[s].equals(theirs[s]) for s in STAGES)


FAULTS = {
    "S3: two ranged GETs reset mid-response": (dict(cut={2, 4}), "cuts", 2, False),
    "S3: 503 SlowDown on four connections": (dict(busy={1, 3, 4, 7}), "throttled", 4, False),
    "S3 work dir: three uploads reset, three connections throttled": (
        dict(busy={2, 5, 8}, reset_puts=3), "put_resets", 3, True),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.slow
def test_retried_storage_faults_change_nothing(fault: str, s3, tmp_path: Path, record):
    endpoint, pool = s3
    kwargs, counter, expected, remote_work = FAULTS[fault]
    proxy = FlakyProxy(int(endpoint.rsplit(":", 1)[1]), **kwargs)
    work = f"s3://{BUCKET}/faults/{tmp_path.name}" if remote_work else tmp_path / "w"
    try:
        summary = run_pipeline(PIPE, _cfg(work, f"http://127.0.0.1:{proxy.port}"))
    finally:
        proxy.close()
    assert getattr(proxy, counter) == expected  # the faults really happened
    assert summary.ok, summary.problems()
    lost, differ = _compare(work, endpoint, pool, tmp_path / "local")
    record(fault, 1, lost, differ)
    assert (lost, differ) == (0, 0)


@pytest.mark.slow
def test_uploads_failing_for_good_commit_nothing_partial_and_the_rerun_resumes(s3, tmp_path: Path, record):
    """After 20 uploads every further upload is reset (retries kept short): the run reports failed
    shards; the bucket holds only whole objects (no temp object; every table has its stats); the
    rerun on a healthy endpoint skips what was committed and ends equal to the local run."""
    import s3fs

    endpoint, pool = s3
    work = f"s3://{BUCKET}/faults/for-good"
    proxy = FlakyProxy(int(endpoint.rsplit(":", 1)[1]), pass_puts=20, reset_puts=10**9)
    try:
        first = run_pipeline(PIPE, _cfg(work, f"http://127.0.0.1:{proxy.port}",
                                        config_kwargs={"retries": {"max_attempts": 1}}))
    except Exception as e:  # the run record or summary upload itself may be the one that fails
        first = e
    finally:
        proxy.close()
    assert proxy.put_resets > 0, (proxy.puts, first)
    assert isinstance(first, Exception) or not first.ok
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    keys = [k.split("/for-good/", 1)[1] for k in fs.find(f"{BUCKET}/faults/for-good")]
    assert not [k for k in keys if k.endswith(".tmp")]
    tables = {k for k in keys if k.endswith(".parquet") and k.split("/")[0] in STAGES}
    assert all(f"stats/{t}" in keys for t in tables)  # a table counts only with its stats (done marker)
    again = run_pipeline(PIPE, _cfg(work, endpoint))
    assert again.ok, again.problems()
    assert sum(r.skipped for r in again.stages) > 0  # the committed shards were not redone
    lost, differ = _compare(work, endpoint, pool, tmp_path / "local")
    record("S3 work dir: every upload after the 20th reset, then rerun", 1, lost, differ)
    assert (lost, differ) == (0, 0)
