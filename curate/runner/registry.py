"""Stages by name: every module of ``curate.stages`` is imported once (each registers its class in
``curate/contract/registry.py``), then a recipe's specs are validated and built into stages."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from curate.contract.base import Stage
from curate.contract.registry import REGISTRY as _REGISTRY
from curate.contract.registry import register_stage  # noqa: F401  (older imports take it from here)
from curate.core.config import PipelineConfig, StageSpec, read_pipeline
from curate.core.errors import ConfigError


def _load_all() -> None:
    """Import every module of curate.stages (lazily, so `import curate` stays light): a stage
    registers itself with @register_stage in its own module, nowhere else."""
    import curate.stages as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


def available_stages() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_stage_class(name: str) -> Any:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r} (allowed: {', '.join(available_stages())})") from None


def build_stage(spec: StageSpec, source: str = "<pipeline>", position: int = 0) -> Stage:
    cls = get_stage_class(spec.name)
    try:
        params = cls.Params.model_validate(spec.params)
    except ValidationError as e:
        lines = [f"{source}: stages[{position}] ({spec.name}): invalid params"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<top>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(cls.Params.model_fields)) or "none: this stage takes no params"
                msg += f" (allowed: {allowed})"
            lines.append(f"  params.{loc}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    stage: Stage = cls(params, spec.id)
    return stage


def spec_of(stage: Stage) -> StageSpec:
    """The validated spec a stage was built from (params resolved): what workers rebuild it from."""
    return StageSpec(name=stage.name, id=stage.stage_id, params=stage.params.model_dump(mode="json"))


def build_stages(pipe: PipelineConfig, source: str = "<pipeline>") -> list[Stage]:
    """Instantiate a pipeline's stages; the index stage is always first (added when absent)."""
    specs = list(pipe.stages)
    if not specs or specs[0].name != "index":
        specs.insert(0, StageSpec(name="index"))
    stages = [build_stage(s, source, i) for i, s in enumerate(specs)]
    seen: set[str] = set()
    for st in stages:
        if st.stage_id in seen:
            hint = "" if st.stage_id != st.name else f" (give each {st.name} stage its own `id:`)"
            raise ConfigError(f"{source}: stage id {st.stage_id!r} appears twice{hint}")
        seen.add(st.stage_id)
    # Optional inputs the pipeline lacks are switched off, then each stage learns what the stages
    # after it read from it (a stage that computes only what is needed computes those too).
    stages = [st.with_earlier(stages[:i]) for i, st in enumerate(stages)]
    # The index (always first) also learns which of its columns the later stages' decisions rest on.
    stages = [st.with_later_reads(set().union(*(later.reads_from(st) | (later.index_columns() if i == 0 else set())
                                                for later in stages[i + 1:])))
              for i, st in enumerate(stages)]
    for i, st in enumerate(stages):
        earlier = {s.stage_id for s in stages[:i]}
        for need in st.reads():
            if need not in earlier:
                raise ConfigError(
                    f"{source}: stage {st.stage_id!r} reads stage {need!r}, which is not earlier in the "
                    f"pipeline (earlier: {', '.join(sorted(earlier)) or 'none'})")
    return stages


def _type_name(ann: Any) -> str:
    text = ann.__name__ if isinstance(ann, type) else str(ann)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", text)


def param_rows(model: type[BaseModel], prefix: str = "") -> list[dict[str, Any]]:
    """name, type, default and description of every field of a parameter model; the fields of a
    nested model (e.g. clip_rank's ``calibrate``) follow it as ``calibrate.<field>``."""
    rows = []
    for key, f in model.model_fields.items():
        rows.append({"name": prefix + key, "type": _type_name(f.annotation),
                     "default": "(required)" if f.is_required() else f.get_default(call_default_factory=True),
                     "description": f.description or ""})
        nested = [a for a in (getattr(f.annotation, "__args__", None) or (f.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in nested:
            rows += param_rows(sub, prefix + key + ".")
    return rows


def describe_stage(name: str) -> dict[str, Any]:
    """A stage's kind, one-line summary and parameters, read from its class and its parameter
    model: what `curate stages NAME` prints and docs/pages/reference/stages.md lists."""
    cls = get_stage_class(name)
    doc = (cls.__doc__ or "").strip().splitlines()
    return {"name": name, "kind": cls.kind, "summary": doc[0] if doc else "", "filters": cls.filters,
            "params": param_rows(cls.Params)}


def load_pipeline(path: str | Path) -> PipelineConfig:
    """A recipe read from YAML, every stage's params validated by its own model (errors name the
    file, the stage and the key)."""
    pipe = read_pipeline(path)
    build_stages(pipe, source=str(path))
    return pipe
