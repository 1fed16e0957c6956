"""Stage contracts (DESIGN.md "Two kinds of stage").

A stage only computes: it returns columns for one shard. Counting stats, writing files, resume and
scheduling live elsewhere (stages/execute.py, engine/), as in datatrove where a filter only says
keep/drop and why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import pyarrow as pa

from curate.config import Strict
from curate.io.layout import WorkDir
from curate.io.parquet import read_table
from curate.io.shards import RawSample, ShardReadResult, iter_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What a task needs to know about the run, small enough to ship to every worker."""

    run_id: str
    workdir: str
    device: str = "cpu"
    model_cache: str | None = None
    seed: int = 0


@dataclass
class ShardContext:
    """Everything a stage may read for one shard."""

    shard_path: str
    shard: str
    stage_id: str
    upstream: list[str]  # ids of earlier filter stages: their keep_ columns define survivors
    run: RunInfo
    evaluate_all: bool = False
    read_result: ShardReadResult = field(default_factory=ShardReadResult)
    _cache: dict[str, pa.Table] = field(default_factory=dict)
    _evaluate: np.ndarray | None = None
    counters: dict[str, float] = field(default_factory=dict)

    def count(self, name: str, n: float = 1) -> None:
        """Add to one of the stage's own counters (written to the shard's stats as ``count:<name>``)."""
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def work(self) -> WorkDir:
        return WorkDir.at(self.run.workdir)

    def read(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        """The table an earlier stage wrote for this shard (rows in index order)."""
        ck = f"{stage_id}:{columns}"
        if ck not in self._cache:
            self._cache[ck] = read_table(self.work.stage_table(stage_id, self.shard), columns)
        return self._cache[ck]

    def index(self, columns: list[str] | None = None) -> pa.Table:
        return self.read("index", columns)

    def survivors(self) -> np.ndarray:
        """Rows kept by every earlier filter stage (a null decision counts as dropped)."""
        n = self.index(["uid"]).num_rows
        mask = np.ones(n, dtype=bool)
        for sid in self.upstream:
            col = self.read(sid, [f"keep_{sid}"]).column(0)
            mask &= col.fill_null(False).to_numpy(zero_copy_only=False)
        return mask

    @property
    def evaluate(self) -> np.ndarray:
        """Rows this stage computes: survivors of earlier filters, or all rows when asked."""
        if self._evaluate is None:
            if self.evaluate_all:
                self._evaluate = np.ones(self.index(["uid"]).num_rows, dtype=bool)
            else:
                self._evaluate = self.survivors()
        return self._evaluate

    def lookup(self, artifact: Path, columns: list[str]) -> dict[str, list]:
        """Columns of a per-shard global artifact (keyed by uid), aligned with the index rows;
        rows not evaluated, or absent from the artifact, get None."""
        import polars as pl

        art = pl.read_parquet(artifact, columns=["uid", *columns])
        by = {r[0]: r[1:] for r in art.iter_rows()}
        empty = (None,) * len(columns)
        uids = self.index(["uid"]).column("uid").to_pylist()
        rows = [by.get(u, empty) if e else empty for u, e in zip(uids, self.evaluate)]
        return {c: [r[i] for r in rows] for i, c in enumerate(columns)}

    def samples(self) -> Iterator[RawSample]:
        """Stream the raw shard; read errors land in ``read_result`` (reported, not raised)."""
        return iter_samples(self.shard_path, self.read_result)


@dataclass
class GlobalContext:
    stage_id: str
    shards: list[str]  # shard names, sorted
    run: RunInfo

    @property
    def work(self) -> WorkDir:
        return WorkDir.at(self.run.workdir)

    def partials(self) -> list[Path]:
        return [self.work.partial(self.stage_id, s) for s in self.shards]

    def pipeline_stage(self, stage_id: str) -> "Stage":
        """Another stage of this run's pipeline, rebuilt from the run record (e.g. the scorer
        whose model a global stage must use again)."""
        import json

        from curate.config import StageSpec
        from curate.stages.registry import build_stage

        run = json.loads((self.work.run_dir(self.run.run_id) / "run.json").read_text())
        spec = next(s for s in run["stages"] if s["id"] == stage_id)
        return build_stage(StageSpec(name=spec["name"], params=spec["params"]))


class Stage:
    """Base of all stages. Subclasses set ``name``, ``Params`` and implement their kind's methods."""

    name: ClassVar[str]
    kind: ClassVar[str]
    Params: ClassVar[type[Strict]]
    # Bump when a change alters outputs: it changes the fingerprint, so resume recomputes.
    version: ClassVar[str] = "1"
    # Filters add keep_<id> / reason_<id>; pure annotators (embeddings, hashes) do not.
    filters: ClassVar[bool] = True
    # Earlier stages whose tables this stage reads (besides index); checked when a pipeline loads.
    needs: ClassVar[tuple[str, ...]] = ()
    # What each value column means: Parquet field metadata, `curate stages`, docs/columns.md.
    columns: ClassVar[dict[str, str]] = {}

    def __init__(self, params: Strict, stage_id: str | None = None):
        self.params = params
        self.stage_id = stage_id or self.name

    def value_fields(self) -> list[pa.Field]:
        """The columns this stage adds besides uid and its decision columns."""
        raise NotImplementedError

    def resources(self, device: str = "cpu") -> dict[str, float] | None:
        """Dask worker resources a task of this stage needs on ``device`` (e.g. ``{"GPU": 1}``)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Recorded in every output file (model, preprocessing...): what makes a value reproducible."""
        return {}

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        """Extra inputs to the fingerprint, such as a checkpoint hash or a vocabulary hash."""
        return {}

    def reads_from(self, stage_name: str) -> set[str]:
        """Columns this stage reads from an earlier stage of kind ``stage_name`` (e.g. dedup reads the
        image stage's ``phash``): a stage that computes only what is needed computes these too."""
        return set()

    def with_later_reads(self, columns: set[str]) -> "Stage":
        """This stage, resolved for what later stages of the pipeline read from it (default: as is)."""
        return self

    def preflight(self, model_cache: str | None = None) -> list[str]:
        """Problems that would fail every shard (weights not found, a reference set missing),
        found once in the driver before any work starts; each names what is missing and the fix."""
        return []

    @property
    def evaluate_all(self) -> bool:
        """DESIGN.md: later stages work on survivors unless the stage asks for every row."""
        return bool(getattr(self.params, "all_rows", False))


class MapStage(Stage):
    kind = "map"

    def process(self, ctx: ShardContext) -> dict[str, Any]:
        """Columns (name -> list/array, one entry per index row) for this shard."""
        raise NotImplementedError


class GlobalStage(Stage):
    kind = "global"

    def partial_fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        """Small per-shard columns the combine step needs (e.g. hashes, scores)."""
        raise NotImplementedError

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        """Read every partial, write the artifact(s) under WORK/global/, return a small summary."""
        raise NotImplementedError

    def apply(self, ctx: ShardContext) -> dict[str, Any]:
        """Per-shard columns from the artifact: a map step."""
        raise NotImplementedError
