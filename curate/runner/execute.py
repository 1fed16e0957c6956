"""Run one stage on one shard: call the stage, check its columns, count stats, write atomically.

These are the functions the engine ships to workers. They know the work-dir layout and the
resume rule, never the engine. A shard is done when its table and its stats file exist with the
stage fingerprint; the stats file is written last, so it doubles as the done-marker.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import StageSpec, fingerprint
from curate.io.layout import WorkDir
from curate.io.storage import WorkPath
from curate.io.parquet import atomic_write_bytes, read_meta, write_table
from curate.engine.base import describe_exception
from curate.io.shards import Shard, SharedShard
from curate.io.storage import set_storage_options
from curate.core.schema import STATS_SCHEMA, stage_schema
from curate.contract.base import GlobalContext, GlobalStage, RunInfo, ShardContext, Stage, StageOutput
from curate.runner.registry import build_stage

log = logging.getLogger(__name__)

# One stage object per worker process and fingerprint: a model is loaded once, reused across shards.
_STAGE_CACHE: dict[str, Stage] = {}


@dataclass(frozen=True)
class StageTask:
    """A picklable description of one stage in one run; small enough to send with every task."""

    spec: StageSpec
    stage_id: str
    upstream: tuple[str, ...]
    fingerprint: str
    run: RunInfo
    shards: tuple[str, ...] = field(default=())  # all shard names (global stages)

    @property
    def cache_key(self) -> str:
        """The fingerprint and every parameter: a parameter left out of the fingerprint (one that
        only decides whether a shard fails) still gets a stage object of its own."""
        return f"{self.fingerprint}:{fingerprint(self.spec.model_dump(mode='json'))}"

    def stage(self, keep: tuple[str, ...] = ()) -> Stage:
        """The stage object, built once per worker. Only the stages of one task stay alive (their
        cache keys in ``keep``): a worker holds the models of the stages it runs now, no others."""
        st = _STAGE_CACHE.get(self.cache_key)
        if st is None:
            st = build_stage(self.spec)
            for fp in [fp for fp in _STAGE_CACHE if fp not in keep]:
                del _STAGE_CACHE[fp]
            _STAGE_CACHE[self.cache_key] = st
        return st


def _meta(task: StageTask, shard: str) -> dict[str, Any]:
    return {"stage": task.stage_id, "shard": shard, "fingerprint": task.fingerprint}


def _has_fp(path: WorkPath, fp: str) -> bool:
    meta = read_meta(path)
    return meta is not None and meta.get("fingerprint") == fp


def is_done(work: WorkDir, stage_id: str, shard: str, fp: str) -> bool:
    return _has_fp(work.stage_stats(stage_id, shard), fp) and _has_fp(work.stage_table(stage_id, shard), fp)


def is_partial_done(work: WorkDir, stage_id: str, shard: str, fp: str) -> bool:
    return _has_fp(work.partial(stage_id, shard), fp)


def done_shards(work: WorkDir, stage_id: str, fp: str, shards: list[Shard], phase: str = "process") -> set[str]:
    """The names of ``shards`` whose outputs of this stage (``process``/``apply``: table and stats;
    ``summarize``: the partial) exist with fingerprint ``fp``: the work dir asked once per stage."""
    if phase == "summarize":
        return {s.name for s in shards if is_partial_done(work, stage_id, s.name, fp)}
    return {s.name for s in shards if is_done(work, stage_id, s.name, fp)}


def global_marker(work: WorkDir, stage_id: str) -> WorkPath:
    return work.global_dir() / f"{stage_id}.done.json"


def is_global_done(work: WorkDir, stage_id: str, fp: str) -> bool:
    p = global_marker(work, stage_id)
    try:
        return bool(json.loads(p.read_text()).get("fingerprint") == fp)
    except (OSError, ValueError):
        return False


def _context(task: StageTask, shard: Shard, shared: SharedShard | None = None,
             keep: tuple[str, ...] = (), written: dict[str, pa.Table] | None = None) -> ShardContext:
    set_storage_options(task.run.storage_options)
    st = task.stage(keep)
    return ShardContext(shard_path=shard.path, shard=shard.name, stage_id=task.stage_id,
                        upstream=list(task.upstream), run=task.run, evaluate_all=st.evaluate_all,
                        reads=tuple(st.reads()), shared=shared, written=written if written is not None else {})


def finalize(stage: Stage, ctx: ShardContext, out: StageOutput) -> tuple[pa.Table, Counter[str], int, int]:
    """The stage's table (declared schema, decision columns from its reasons) and its counts:
    reasons, rows evaluated, rows kept. A stage that returns ``uid`` made the rows (the index):
    every row is its own; any other stage's rows are the index's, evaluated as ``ctx.evaluate``."""
    cols = dict(out.columns)
    reasons = out.reasons
    if "uid" in cols:
        evaluated = np.ones(len(cols["uid"]), dtype=bool)
    else:
        cols["uid"] = ctx.index(["uid"]).column("uid")
        evaluated = ctx.evaluate
    n = len(cols["uid"])
    schema = stage_schema(stage.stage_id, stage.value_fields(), stage.filters, stage.columns)
    counts: Counter[str] = Counter()
    if stage.filters:
        if reasons is None or len(reasons) != n:
            raise RuntimeError(f"stage {stage.stage_id} returned {0 if reasons is None else len(reasons)} "
                               f"decisions for {n} rows")
        # rows not evaluated (dropped by an earlier stage) have no decision: null keep and reason
        ev = pa.array(evaluated, pa.bool_())
        rs = pc.if_else(ev, pa.array(reasons, pa.string()), pa.scalar(None, pa.string()))
        keep = pc.if_else(ev, pc.is_null(rs), pa.scalar(None, pa.bool_()))
        n_kept = int(pc.sum(keep).as_py() or 0)
        counts.update({d["values"]: d["counts"] for d in pc.value_counts(rs.drop_null()).to_pylist()})
        cols[f"keep_{stage.stage_id}"] = keep
        cols[f"reason_{stage.stage_id}"] = rs
    else:
        n_kept = int(evaluated.sum())
    arrays = []
    for f in schema:
        if f.name not in cols:
            raise RuntimeError(f"stage {stage.stage_id} did not return column {f.name!r}")
        val = cols[f.name]
        if len(val) != n:
            raise RuntimeError(f"stage {stage.stage_id}: column {f.name} has {len(val)} rows, expected {n}")
        arrays.append(val if isinstance(val, (pa.Array, pa.ChunkedArray)) and val.type == f.type
                      else pa.array(val, type=f.type))
    extra = set(cols) - set(schema.names)
    if extra:
        raise RuntimeError(f"stage {stage.stage_id} returned undeclared columns {sorted(extra)}")
    return pa.Table.from_arrays(arrays, schema=schema), counts, int(evaluated.sum()), n_kept


def _stats_table(task: StageTask, shard: str, metrics: dict[str, float],
                 details: dict[str, str] | None = None) -> pa.Table:
    names = sorted(metrics)
    details = details or {}
    return pa.table({
        "run_id": [task.run.run_id] * len(names),
        "stage": [task.stage_id] * len(names),
        "shard": [shard] * len(names),
        "metric": names,
        "value": [float(metrics[m]) for m in names],
        "detail": [details.get(m) for m in names],
    }, schema=STATS_SCHEMA)


def run_shard(task: StageTask, shard: Shard, phase: str = "process", *, shared: SharedShard | None = None,
              keep: tuple[str, ...] = (), written: dict[str, pa.Table] | None = None) -> dict[str, Any]:
    """Run a map stage (``process``) or a global stage's ``apply`` on one shard; write outputs.
    ``shared``: the tar read of a fused task; ``keep``: the cache keys of that task's stages;
    ``written``: the tables its earlier stages wrote (later stages read them from memory, not back
    from the work dir, which may be a bucket), and this stage's table is added to it."""
    t0 = time.perf_counter()
    stage = task.stage(keep)
    ctx = _context(task, shard, shared, keep, written)
    work = ctx.work
    if is_done(work, task.stage_id, ctx.shard, task.fingerprint):
        return {"shard": ctx.shard, "skipped": True}
    table, counts, n_in, n_kept = finalize(stage, ctx, getattr(stage, phase)(ctx))
    meta = _meta(task, ctx.shard) | {"describe": stage.describe()}
    write_table(table, work.stage_table(task.stage_id, ctx.shard), meta=meta)
    if written is not None:
        written[task.stage_id] = table
    metrics: dict[str, float] = {"n_rows": table.num_rows, "n_in": n_in, "n_kept": n_kept,
                                 "seconds": time.perf_counter() - t0,
                                 "bytes_read": ctx.read_result.n_bytes}
    for reason, c in counts.items():
        metrics[f"dropped:{reason}"] = c
    counters: dict[str, float] = dict(ctx.counters)
    if phase == "apply":  # the stage's summarize step on this shard counted too
        earlier = read_meta(work.partial(task.stage_id, ctx.shard)) or {}
        metrics["summarize_seconds"] = earlier.get("seconds", 0.0)
        for name, more in earlier.get("counters", {}).items():
            counters[name] = counters.get(name, 0) + more
    for name, total in counters.items():
        metrics[f"count:{name}"] = total
    details = {}
    if ctx.read_result.error:
        metrics["shard_error"] = 1
        details["shard_error"] = ctx.read_result.error
    # Stats last: their presence with this fingerprint marks the shard done.
    write_table(_stats_table(task, ctx.shard, metrics, details), work.stage_stats(task.stage_id, ctx.shard),
                meta=_meta(task, ctx.shard))
    return {"shard": ctx.shard, "skipped": False, "n_in": n_in, "n_kept": n_kept,
            "error": ctx.read_result.error}


def run_fused(tasks: tuple[StageTask, ...], shard: Shard) -> dict[str, Any]:
    """Consecutive map stages on one shard in one task, in order, the tar read once: each stage
    writes its own table and stats exactly as ``run_shard`` does alone, so a stage done before is
    skipped, and a failure (raised for the engine to retry or report) leaves the outputs of the
    stages before it. The tar's samples stay in memory while a later stage still reads images."""
    keep = tuple(t.cache_key for t in tasks)
    stages = [t.stage(keep) for t in tasks]
    last_reader = max((k for k, st in enumerate(stages) if k > 0 and st.needs_pixels()), default=-1)
    shared = SharedShard(shard.path) if last_reader > 0 else None
    done: dict[str, Any] = {}
    written: dict[str, pa.Table] = {}
    for k, task in enumerate(tasks):
        try:
            done[task.stage_id] = run_shard(task, shard, shared=shared, keep=keep, written=written)
        except Exception as e:
            raise FusedStageError(f"stage {task.stage_id}: {describe_exception(e)}") from e
        if shared is not None and k >= last_reader:
            shared.release()
    return {"shard": shard.name, "stages": done}


class FusedStageError(RuntimeError):
    """A stage of a fused task failed; the message names the stage."""


def run_summarize(task: StageTask, shard: Shard) -> dict[str, Any]:
    """A global stage's summarize step on one shard: the partial, with the step's seconds and
    counters in its metadata (apply adds them to the shard's stats)."""
    t0 = time.perf_counter()
    stage = task.stage()
    ctx = _context(task, shard)
    work = ctx.work
    if is_partial_done(work, task.stage_id, ctx.shard, task.fingerprint):
        return {"shard": ctx.shard, "skipped": True}
    cols = cast(GlobalStage, stage).summarize(ctx)
    schema = pa.schema(cast(GlobalStage, stage).partial_fields())
    table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)
    meta = _meta(task, ctx.shard) | {"seconds": time.perf_counter() - t0, "counters": ctx.counters}
    write_table(table, work.partial(task.stage_id, ctx.shard), meta=meta)
    return {"shard": ctx.shard, "skipped": False, "rows": table.num_rows}


def _global_context(task: StageTask, stage: Stage) -> GlobalContext:
    return GlobalContext(stage_id=task.stage_id, shards=list(task.shards), run=task.run,
                         reads=tuple(stage.reads()), fingerprint=task.fingerprint)


def combine_parts(task: StageTask) -> int:
    """How many partitioned-combine tasks the stage asks for (0: none); read from the partials."""
    set_storage_options(task.run.storage_options)
    stage = task.stage()
    return cast(GlobalStage, stage).combine_parts(_global_context(task, stage))


def run_combine_part(task: StageTask, part: int, parts: int) -> int:
    """One task of a partitioned combine: its table is stored atomically, and a part stored
    before (same fingerprint) is not recomputed. Returns its row count."""
    set_storage_options(task.run.storage_options)
    stage = task.stage()
    gctx = _global_context(task, stage)
    path = gctx.parts(parts)[part]
    if path.exists():
        return -1
    table = cast(GlobalStage, stage).combine_part(gctx, part, parts)
    write_table(table, path)
    return int(table.num_rows)


def run_combine(task: StageTask) -> dict[str, Any]:
    """A global stage's combine step; its summary and seconds are stored with the done marker.
    A partitioned combine's parts are removed once the marker is written."""
    t0 = time.perf_counter()
    set_storage_options(task.run.storage_options)
    stage = task.stage()
    gctx = _global_context(task, stage)
    work = gctx.work
    if is_global_done(work, task.stage_id, task.fingerprint):
        return dict(json.loads(global_marker(work, task.stage_id).read_text())["summary"])
    summary = cast(GlobalStage, stage).combine(gctx)
    atomic_write_bytes(global_marker(work, task.stage_id),
                       json.dumps({"fingerprint": task.fingerprint, "summary": summary,
                                   "seconds": time.perf_counter() - t0}, sort_keys=True, default=str).encode())
    _remove_parts(gctx)
    return summary


def _remove_parts(gctx: GlobalContext) -> None:
    folder = gctx.parts(1)[0].parent
    if not folder.exists():
        return
    for f in folder.glob("*.parquet"):
        f.unlink()
    if not gctx.work.remote:  # object storage has no folders to remove
        folder.rmdir()
