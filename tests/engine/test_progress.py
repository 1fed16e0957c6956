"""A heartbeat while shards run: samples done, rate and ETA at least every few seconds, also before
the first shard finishes, from the in-process engine and from Dask workers; a worker's warnings
reach the driver's log instead of breaking its progress bar."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from curate.core import heartbeat
from curate.runner.pipeline import run_pipeline
from curate.engine import make_executor, progress
from tests.conftest import make_config, make_pipeline


@pytest.fixture
def quick_lines(monkeypatch, caplog):
    """Progress lines every 0.2 s instead of 10 s, captured."""
    orig = progress.Progress.__init__
    monkeypatch.setattr(progress.Progress, "__init__",
                        lambda self, label, total, every_s=10.0: orig(self, label, total, every_s=0.2))
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records if r.name == "curate.progress"]


def _slow_shard(item: int) -> int:
    """A task that goes through 30 samples in about 3 s and warns once, as a stage would."""
    tick = heartbeat.Ticker(heartbeat.current_sink(), "stage-a", f"shard-{item}", 30, every_s=0.1)
    for _ in range(30):
        time.sleep(0.1)
        tick.tick()
    tick.close()
    logging.getLogger("some.library").warning("a library's warning on shard %d", item)
    return item


@pytest.mark.parametrize("kind", ["inprocess", "local_cluster"])
@pytest.mark.slow
def test_lines_count_samples_before_the_first_shard_finishes(kind: str, quick_lines, tmp_path: Path, caplog):
    with make_executor(make_config("unused", tmp_path, kind=kind, n_workers=1)) as ex:
        out = ex.map(_slow_shard, [0, 1], label="stage-a")
    assert [o.value for o in out] == [0, 1]
    lines = quick_lines()
    early = [ln for ln in lines if ln.startswith("stage-a: 0/2 shards, ") and " samples" in ln and "ETA ~" in ln]
    assert early, lines
    assert lines[-1].startswith("stage-a: 2/2 shards (60 samples) in"), lines[-1]
    warned = [r for r in caplog.records if r.name == "some.library"]
    assert [r.getMessage() for r in warned] == ["a library's warning on shard 0", "a library's warning on shard 1"]


@pytest.mark.slow
def test_a_run_on_one_large_shard_reports_its_samples(quick_lines, tmp_path: Path):
    from curate.tools.synth import synthesize

    synthesize(tmp_path / "pool", samples=600, shards=1, seed=1)
    pipe = make_pipeline(("image", {"measures": "all"}))
    assert run_pipeline(pipe, make_config(str(tmp_path / "pool" / "*.tar"), tmp_path / "w")).ok
    lines = quick_lines()
    assert any(ln.startswith("index+image: 0/1 shards, samples: index 600, image ") for ln in lines), lines
    assert lines[-1].startswith("index+image: 1/1 shards (samples: index 600, image 600) in")
