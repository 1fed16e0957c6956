"""Stage contracts (DESIGN.md "Two kinds of stage").

A stage only computes: for one shard it returns a ``StageOutput`` (value columns and, for a
filter, one reason per row). Counting stats, writing files, resume and scheduling live elsewhere
(runner/execute.py, engine/), as in datatrove where a filter only says keep/drop and why.

Every read of another stage's table goes through the context (``ctx.read(stage_id, ...)``), and
only stages the reader declares (``Stage.reads()``), its upstream filters and the index are
readable: what a stage reads is part of its fingerprint.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import polars as pl

from curate.core.config import Strict
from curate.core.heartbeat import Sink, Ticker, current_sink
from curate.io.layout import WorkDir
from curate.io.storage import WorkPath
from curate.io.parquet import atomic_write_bytes, read_frame, read_meta, read_table
from curate.io.shards import RawSample, ShardReadResult, SharedShard, iter_indexed_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What a task needs to know about the run, small enough to ship to every worker."""

    run_id: str
    workdir: str
    device: str = "cpu"
    model_cache: str | None = None
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StageOutput:
    """What a stage returns for one shard.

    ``columns``: every value column the stage declares, one entry per index row (None where the
    stage did not evaluate the row). ``reasons``: for a filter, why each row is dropped (None:
    kept); entries of rows the stage did not evaluate are ignored. A stage that creates the rows
    (the index) also returns ``uid`` among its columns."""

    columns: dict[str, Any]
    reasons: Sequence[str | None] | None = None


class UndeclaredRead(RuntimeError):
    """A stage read another stage's table without declaring it (a bug in the stage)."""


def _check_read(reader: str, stage_id: str, allowed: set[str]) -> None:
    if stage_id not in allowed:
        raise UndeclaredRead(f"stage {reader!r} reads stage {stage_id!r} but does not declare it "
                             f"(declared: {', '.join(sorted(allowed))}); return it from reads()")


@dataclass
class ShardContext:
    """Everything a stage may read for one shard."""

    shard_path: str
    shard: str
    stage_id: str
    upstream: list[str]  # ids of earlier filter stages: their keep_ columns define survivors
    run: RunInfo
    evaluate_all: bool = False
    reads: tuple[str, ...] = ()  # stage ids this stage declared it reads
    read_result: ShardReadResult = field(default_factory=ShardReadResult)
    counters: dict[str, float] = field(default_factory=dict)
    shared: SharedShard | None = None  # the tar read shared by fused map stages (None: read the tar)
    # tables the earlier stages of a fused task wrote for this shard, as written (not read back)
    written: dict[str, pa.Table] = field(default_factory=dict)
    # where sample counts go while the task runs (the engine's progress line); None: nowhere
    heartbeat: Sink | None = field(default_factory=current_sink)
    _cache: dict[str, pa.Table] = field(default_factory=dict)
    _evaluate: np.ndarray | None = None

    def count(self, name: str, n: float = 1) -> None:
        """Add to one of the stage's own counters (written to the shard's stats as ``count:<name>``)."""
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def work(self) -> WorkDir:
        return WorkDir.at(self.run.workdir)

    def _table(self, stage_id: str, columns: list[str] | None) -> pa.Table:
        if stage_id in self.written:
            t = self.written[stage_id]
            return t.select(columns) if columns is not None else t
        return read_table(self.work.stage_table(stage_id, self.shard), columns)

    def read(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        """The table an earlier stage wrote for this shard (rows in index order)."""
        _check_read(self.stage_id, stage_id, {"index", *self.upstream, *self.reads})
        ck = f"{stage_id}:{columns}"
        if ck not in self._cache:
            self._cache[ck] = self._table(stage_id, columns)
        return self._cache[ck]

    def index(self, columns: list[str] | None = None) -> pa.Table:
        return self.read("index", columns)

    @property
    def n_rows(self) -> int:
        return int(self.index(["uid"]).num_rows)

    def survivors(self) -> np.ndarray:
        """Rows kept by every earlier filter stage (a null decision counts as dropped)."""
        mask = np.ones(self.n_rows, dtype=bool)
        for sid in self.upstream:
            col = self.read(sid, [f"keep_{sid}"]).column(0)
            mask &= col.fill_null(False).to_numpy(zero_copy_only=False)
        return mask

    @property
    def evaluate(self) -> np.ndarray:
        """Rows this stage computes: survivors of earlier filters, or all rows when asked."""
        if self._evaluate is None:
            self._evaluate = np.ones(self.n_rows, dtype=bool) if self.evaluate_all else self.survivors()
        return self._evaluate

    def rows(self) -> list[int]:
        """Positions (in index order) of the rows this stage computes."""
        return np.flatnonzero(self.evaluate).tolist()

    def column(self, name: str, rows: list[int] | None = None, stage_id: str = "index") -> list[Any]:
        """One column of an earlier stage's table as a list, for ``rows`` (default: every row)."""
        values = self.read(stage_id, [name]).column(name).to_pylist()
        return values if rows is None else [values[i] for i in rows]

    def scatter(self, values: Mapping[str, Sequence[Any]], rows: list[int],
                reasons: Sequence[str | None] | None = None) -> StageOutput:
        """A ``StageOutput`` from columns computed for ``rows`` only: spread back to full length,
        None in the rows not computed."""
        n = self.n_rows
        if len(rows) == n:  # every row computed (rows are sorted positions): nothing to spread
            return StageOutput({k: list(v) for k, v in values.items()}, None if reasons is None else list(reasons))
        at = np.asarray(rows, dtype=np.int64)

        def spread(vals: Sequence[Any]) -> list[Any]:
            # object arrays copy references in C; fromiter keeps a list value (an embedding) one object
            full = np.full(n, None, dtype=object)
            full[at] = np.fromiter(vals, dtype=object, count=len(at))
            return full.tolist()

        return StageOutput({name: spread(vals) for name, vals in values.items()},
                           None if reasons is None else spread(reasons))

    def reader(self) -> Callable[..., Iterator[tuple[int, RawSample]]]:
        """``(result, want) -> (row, sample)`` over the shard, as ``iter_indexed_samples`` takes
        them: the tar itself, or the one read that the map stages fused in this task share (read
        now, so that loader processes forked later inherit it)."""
        if self.shared is not None:
            return self.shared.load(self.read_result).indexed
        return functools.partial(iter_indexed_samples, self.shard_path)

    def ticker(self, total: int | None) -> Ticker:
        """Counts the samples this stage goes through on the shard, for the driver's progress line
        (``samples`` and ``samples_at`` count theirs; a stage with its own data path ticks this)."""
        return Ticker(self.heartbeat, self.stage_id, self.shard, total)

    def samples(self) -> Iterator[RawSample]:
        """Stream the raw shard; read errors land in ``read_result`` (reported, not raised)."""
        tick = self.ticker(None)
        for _, s in self.reader()(self.read_result):
            yield s
            tick.tick()
        tick.close()

    def samples_at(self, rows: list[int]) -> Iterator[tuple[int, RawSample]]:
        """(row, sample) for ``rows`` in tar order; the other members are skipped unread. A sample
        whose key differs from the index (the shard changed since indexing) is an error."""
        want = set(rows)
        keys = self.column("key")
        tick = self.ticker(len(want))
        for i, s in self.reader()(self.read_result, want.__contains__):
            if i >= len(keys):
                break
            if s.key != keys[i]:
                raise RuntimeError(f"shard {self.shard} changed since indexing (row {i}: {s.key} != {keys[i]})")
            yield i, s
            tick.tick()
        tick.close()

    def describe(self, stage_id: str) -> dict[str, Any]:
        """What a declared earlier stage recorded about how it computed this shard's values
        (model, checkpoint...)."""
        _check_read(self.stage_id, stage_id, {"index", *self.upstream, *self.reads})
        meta = read_meta(self.work.stage_table(stage_id, self.shard))
        return (meta or {}).get("describe") or {}

    def cache_file(self, name: str) -> WorkPath | None:
        """Where a stage keeps a value it computes once per run and every shard reuses (class
        embeddings...): WORK/cache/<stage id>/<name>; None where there is no work dir."""
        return self.work.root / "cache" / self.stage_id / name

    def pipeline_stage(self, stage_id: str) -> "Stage":
        """A declared earlier stage of this run's pipeline, rebuilt from the run record (e.g. the
        scorer whose model a later stage uses again)."""
        _check_read(self.stage_id, stage_id, set(self.reads))
        return _recorded_stage(self.work, self.run.run_id, stage_id)

    def lookup(self, artifact: WorkPath, columns: list[str]) -> dict[str, list[Any]]:
        """Columns of a per-shard global artifact (keyed by uid), aligned with the index rows;
        rows not evaluated, or absent from the artifact, get None."""
        art = read_frame(artifact, columns=["uid", *columns])
        by = {r[0]: r[1:] for r in art.iter_rows()}
        empty = (None,) * len(columns)
        uids = self.column("uid")
        rows = [by.get(u, empty) if e else empty for u, e in zip(uids, self.evaluate)]
        return {c: [r[i] for r in rows] for i, c in enumerate(columns)}


@dataclass
class GlobalContext:
    stage_id: str
    shards: list[str]  # shard names, sorted
    run: RunInfo
    reads: tuple[str, ...] = ()
    fingerprint: str = ""

    @property
    def work(self) -> WorkDir:
        return WorkDir.at(self.run.workdir)

    def partials(self) -> list[WorkPath]:
        return [self.work.partial(self.stage_id, s) for s in self.shards]

    def parts(self, n: int) -> list[WorkPath]:
        """Where the ``n`` tasks of a partitioned combine stored their results (``combine_part``)."""
        return [self.work.combine_part(self.stage_id, self.fingerprint, k) for k in range(n)]

    def read(self, stage_id: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """The table a declared earlier stage wrote for one shard."""
        _check_read(self.stage_id, stage_id, {"index", *self.reads})
        return read_table(self.work.stage_table(stage_id, shard), columns)

    def describe(self, stage_id: str) -> dict[str, Any]:
        """What a declared earlier stage recorded about how it computed its values (model, ...)."""
        _check_read(self.stage_id, stage_id, {"index", *self.reads})
        for s in self.shards:
            meta = read_meta(self.work.stage_table(stage_id, s))
            if meta and meta.get("describe"):
                return dict(meta["describe"])
        return {}

    def unit_embeddings(self, stage_id: str, column: str, shard: str, keep: set[str] | dict[str, int]
                        ) -> tuple[list[str], np.ndarray]:
        """(uids, L2-normalised embeddings) of one shard's rows in ``keep`` that have an embedding."""
        from curate.io.embeddings import unit_rows

        return unit_rows(self.read(stage_id, shard, ["uid", column]), column, keep)

    def stored_embeddings(self, stage_id: str, column: str, shard: str, keep: set[str] | dict[str, int]
                          ) -> tuple[list[str], np.ndarray]:
        """(uids, embeddings as stored, in float32) of one shard's rows in ``keep`` that have one."""
        from curate.io.embeddings import kept_rows

        return kept_rows(self.read(stage_id, shard, ["uid", column]), column, keep)

    def write_json(self, name: str, obj: Any) -> WorkPath:
        """An artifact under WORK/global/, written atomically."""
        path = self.work.global_artifact(name, ".json")
        atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())
        return path

    def pipeline_stage(self, stage_id: str) -> "Stage":
        """Another stage of this run's pipeline, rebuilt from the run record (e.g. the scorer
        whose model a global stage must use again)."""
        _check_read(self.stage_id, stage_id, set(self.reads))
        return _recorded_stage(self.work, self.run.run_id, stage_id)


def _recorded_stage(work: WorkDir, run_id: str, stage_id: str) -> "Stage":
    """A stage rebuilt from the run record's resolved params (the runner has loaded every stage
    class before any task runs)."""
    from curate.contract.registry import REGISTRY

    run = json.loads((work.run_dir(run_id) / "run.json").read_text())
    spec = next(s for s in run["stages"] if s["id"] == stage_id)
    cls: Any = REGISTRY[spec["name"]]
    stage: Stage = cls(cls.Params.model_validate(spec["params"]), stage_id)
    return stage


class Stage:
    """Base of all stages. Subclasses set ``name``, ``Params`` and implement their kind's methods."""

    name: ClassVar[str]
    kind: ClassVar[str]
    Params: ClassVar[type[Strict]]
    # Bump when a change alters outputs: it changes the fingerprint, so resume recomputes.
    version: ClassVar[str] = "1"
    # Filters add keep_<id> / reason_<id>; pure annotators (embeddings, hashes) do not.
    filters: ClassVar[bool] = True
    # What each value column means: Parquet field metadata, `curate stages`, docs/pages/reference/columns.md.
    columns: ClassVar[dict[str, str]] = {}

    def __init__(self, params: Strict, stage_id: str | None = None):
        self.params = params
        self.stage_id = stage_id or self.name

    def reads(self) -> tuple[str, ...]:
        """Ids of the earlier stages whose tables this stage reads (besides the index and the
        decisions of earlier filters): checked when a pipeline loads, part of the fingerprint."""
        return ()

    def value_fields(self) -> list[pa.Field]:
        """The columns this stage adds besides uid and its decision columns."""
        raise NotImplementedError

    def resources(self, device: str = "cpu") -> dict[str, float] | None:
        """Dask worker resources a task of this stage needs on ``device`` (e.g. ``{"GPU": 1}``)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Recorded in every output file (model, preprocessing...): what makes a value reproducible."""
        return {}

    def fingerprint_params(self) -> dict[str, Any]:
        """The parameters that decide what the stage writes (default: all of them); a parameter
        that only decides whether a shard fails is left out, so changing it redoes nothing."""
        return self.params.model_dump(mode="json")

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        """Extra inputs to the fingerprint, such as a checkpoint hash or a vocabulary hash."""
        return {}

    def reads_from(self, stage: "Stage") -> set[str]:
        """Columns this stage reads from the earlier ``stage`` (e.g. dedup reads the image stage's
        ``phash``): a stage that computes only what is needed computes these too."""
        return set()

    def with_later_reads(self, columns: set[str]) -> "Stage":
        """This stage, resolved for what later stages of the pipeline read from it (default: as is)."""
        return self

    def with_earlier(self, earlier: list["Stage"]) -> "Stage":
        """This stage, resolved for the stages before it in the pipeline (e.g. an optional input
        that the pipeline lacks is switched off); default: as is."""
        return self

    def needs_pixels(self) -> bool:
        """Whether the stage reads image bytes (a metadata pool, without images, cannot feed it)."""
        return False

    def index_columns(self) -> set[str]:
        """Columns of a metadata pool (as the index names them: ``caption``, ``original_width``...)
        this stage's decisions rest on: a pool without one of them is refused before any work."""
        return set()

    def computed_columns(self, metadata_pool: bool) -> set[str]:
        """The value columns this stage computes with its parameters on this kind of pool; the
        others stay null in every row and are left out of exports (default: every column)."""
        return {f.name for f in self.value_fields()}

    def provides_embeddings(self) -> bool:
        """Whether this stage's table holds unit ``image_emb`` and ``text_emb`` columns that later
        stages (dedup, reference filter, classifier, clip_loss, heads) may read."""
        return False

    def preflight_pool(self, shard_paths: list[str]) -> list[str]:
        """Problems with the pool itself (a metadata table without a column the pipeline needs),
        found in the driver before any work from a quick look at the first shard(s)."""
        return []

    def preflight(self, model_cache: str | None = None) -> list[str]:
        """Problems that would fail every shard (weights not found, a reference set missing),
        found once in the driver before any work starts; each names what is missing and the fix."""
        return []

    def format_summary(self, summary: dict[str, Any]) -> list[str]:
        """Lines `curate stats` prints for what this (global) stage decided."""
        return [f"{self.stage_id}: {json.dumps(summary, default=str)[:200]}"]

    @property
    def evaluate_all(self) -> bool:
        """DESIGN.md: later stages work on survivors unless the stage asks for every row."""
        return bool(getattr(self.params, "all_rows", False))


def embedding_source(reader: str, earlier: list[Stage], source_id: str) -> Stage | None:
    """The earlier stage ``source_id`` a stage reads embeddings from, checked to store them (None
    when the pipeline lacks it: the pipeline check names a missing read)."""
    from curate.core.errors import ConfigError

    src = next((s for s in earlier if s.stage_id == source_id), None)
    if src is not None and not src.provides_embeddings():
        raise ConfigError(f"stage {reader!r} reads embeddings from {source_id!r}, which stores none: use a "
                          "clip_score stage with store_embeddings: true, or metadata_embeddings on a metadata pool")
    return src


class MapStage(Stage):
    kind = "map"

    def process(self, ctx: ShardContext) -> StageOutput:
        """Columns (one entry per index row) and reasons for this shard."""
        raise NotImplementedError


class GlobalStage(Stage):
    """summarize (per shard) -> combine (once, over every shard) -> apply (per shard).

    The kit: ``write_results`` stores combine's per-sample decisions for ``apply`` to look up by
    uid (the default ``apply``); the dict combine returns is stored with the stage's done marker
    and printed by ``format_summary``."""

    kind = "global"

    def partial_fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        """Small per-shard columns the combine step needs (e.g. hashes, scores)."""
        raise NotImplementedError

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        """Read every partial, write the artifact(s) under WORK/global/, return a small summary."""
        raise NotImplementedError

    def combine_parts(self, ctx: GlobalContext) -> int:
        """How many ``combine_part`` tasks run (in parallel) before ``combine``; 0: none, combine
        does all the work in one task."""
        return 0

    def combine_part(self, ctx: GlobalContext, part: int, parts: int) -> pa.Table:
        """One share of the combine work, as its own task: the engine stores the table at
        ``ctx.parts(parts)[part]`` for ``combine`` to read, and skips parts stored before."""
        raise NotImplementedError

    def results_dir(self, work: WorkDir) -> WorkPath:
        return work.global_dir() / self.stage_id

    def write_results(self, ctx: GlobalContext, results: "pl.DataFrame") -> None:
        """Per-sample results of combine (``uid``, ``shard``, the stage's value columns and
        ``reason``), one Parquet per shard (see ``results_writer``)."""
        parts = {key[0]: part for key, part in results.partition_by("shard", as_dict=True).items()}
        empty = results.clear()
        with self.results_writer(ctx) as put:
            for shard in ctx.shards:  # one pass over the results, not one filter per shard
                put(shard, parts.pop(shard, empty).drop("shard"))

    @contextlib.contextmanager
    def results_writer(self, ctx: GlobalContext) -> Iterator[Callable[[str, "pl.DataFrame"], None]]:
        """``put(shard, frame)`` writes one shard's results (``uid``, value columns, ``reason``) as
        combine streams them; a shard never put gets an empty file. The set is swapped in whole when
        the block ends: a crash leaves the old set or none. On object storage (no rename) each
        shard's object is replaced whole and stale ones removed; ``apply`` runs only after the
        stage's done marker, which is written after every object."""
        import secrets
        import shutil

        from curate.io.parquet import write_table

        final = self.results_dir(ctx.work)
        target = final if ctx.work.remote else final.with_name(f".{final.name}.partial-{secrets.token_hex(4)}")
        schema: list[pa.Field] = []

        def put(shard: str, frame: "pl.DataFrame") -> None:
            table = frame.to_arrow()
            write_table(table, target / f"{shard}.parquet")
            schema[:] = [table.schema]
            written.add(shard)

        written: set[str] = set()
        yield put
        if schema:
            for shard in ctx.shards:
                if shard not in written:
                    write_table(schema[0].empty_table(), target / f"{shard}.parquet")
        if ctx.work.remote:
            mine = {f"{s}.parquet" for s in ctx.shards}
            for old in final.glob("*.parquet"):
                if old.name not in mine:
                    old.unlink()
            return
        local, staged = Path(str(final)), Path(str(target))  # a local work dir: plain paths, atomic renames
        old = local.with_name(f".{local.name}.old-{secrets.token_hex(4)}")
        if local.exists():
            local.rename(old)
        staged.mkdir(parents=True, exist_ok=True)
        staged.rename(local)
        shutil.rmtree(old, ignore_errors=True)

    def apply(self, ctx: ShardContext) -> StageOutput:
        """Per-shard columns: the results combine wrote, looked up by uid."""
        names = [f.name for f in self.value_fields()]
        cols = ctx.lookup(self.results_dir(ctx.work) / f"{ctx.shard}.parquet", [*names, "reason"])
        reasons = cols.pop("reason")
        return StageOutput(cols, reasons if self.filters else None)
