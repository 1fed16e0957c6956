"""Typed, validated configuration.

Two files make a run: a *pipeline* (WHAT: ordered stages and their parameters, ``pipelines/``)
and a *run config* (WHERE and HOW: input, work dir, executor, device, models, ``configs/``).
Unknown keys are errors; every error names the file, the key and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate.core.errors import ConfigError  # noqa: F401  (importers take it from here too)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def require_exactly_one(model: BaseModel, *names: str) -> None:
    """For params that offer alternative rules (e.g. top_fraction or min_score)."""
    if sum(getattr(model, n) is not None for n in names) != 1:
        raise ValueError(f"set exactly one of {' or '.join(names)}")


class ExecutorConfig(Strict):
    kind: Literal["local_cluster", "local_cuda_cluster", "address", "inprocess"] = Field(
        "local_cluster",
        description="local_cluster: embedded Dask LocalCluster; local_cuda_cluster: one worker pinned to "
        "each GPU of this node plus n_workers CPU workers; address: connect to a running scheduler; "
        "inprocess: no Dask, for tests and debugging",
    )
    address: str | None = Field(None, description="tcp://host:8786 (or DASK_SCHEDULER_ADDRESS)")
    n_workers: int = Field(2, ge=1, description="worker processes (local_cuda_cluster: CPU workers beside the GPU ones)")
    gpus: list[int] | None = Field(None, description="local_cuda_cluster: the GPU ids to use (null: every visible GPU)")
    threads_per_worker: int = Field(1, ge=1, description="threads per worker process")
    memory_limit: str = Field("4GiB", description="memory per worker process (Dask's memory_limit)")
    retries: int = Field(2, ge=0, description="times a failed shard task is retried before it counts as failed")
    dashboard: bool = Field(True, description="serve the Dask dashboard (its address is printed at start)")
    task_timeout_s: float | None = Field(None, gt=0, description="fail a shard task after this long (with "
                                         "fuse: the task of all the shard's consecutive map stages)")
    fuse: bool = Field(True, description="run consecutive map stages as one task per shard, reading its "
                       "tar once (false: one task per stage and shard, each stage reading the tar)")


class RunConfig(Strict):
    input: str | list[str] | None = Field(None, description="the pool: a path, folder, glob, brace pattern, "
                                          "list file or URL of shards (tars, metadata Parquet, URL lists); --input overrides")
    workdir: str = Field("work", description="where every table, stats file and run record goes: a folder, "
                         "or a URL (s3://bucket/work) when workers share no disk")
    executor: ExecutorConfig = ExecutorConfig()
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where model stages run; auto: cuda when a GPU is visible")
    model_cache: str | None = Field(None, description="folder (or URL, copied to each machine once) with CLIP "
                                    "checkpoints and open_clip tags staged by `curate models fetch`")
    columns: dict[str, str] = Field(default_factory=dict, description="the pool's own column names for curate's "
                                    "(e.g. {caption: alt_text}); given to the index stage")
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="fsspec options per protocol for input shards, work dir and model cache on object storage, "
        "e.g. {s3: {endpoint_url: http://minio:9000}}; credentials from the environment (never saved)")


class StageSpec(Strict):
    name: str = Field(..., description="the stage's kind (`curate stages` lists them)")
    id: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
                           description="the stage's id in this pipeline (default: its kind); two stages "
                           "of one kind need distinct ids")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's parameters")


class PipelineConfig(Strict):
    name: str = Field(description="the recipe's name (default: the file name)")
    description: str = Field("", description="what the recipe reproduces and what it needs")
    stages: list[StageSpec]


def _format_validation(path: str | Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg += f" (allowed: {ctx['expected']})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    data: dict[str, Any] = _load_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(path or "<command line>", e)) from None


def read_pipeline(path: str | Path) -> PipelineConfig:
    """A recipe's YAML as a PipelineConfig; each stage's params are validated by the runner's
    ``load_pipeline``, which knows the stages."""
    data = _load_yaml(path)
    data.setdefault("name", Path(path).stem)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(path, e)) from None


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def scheduler_address(cfg: RunConfig) -> str | None:
    return cfg.executor.address or os.environ.get("DASK_SCHEDULER_ADDRESS")
