"""Run stages on a handful of in-memory samples: no tar, no work dir, no engine (unit tests, notebooks).

    table = run_in_memory(TextStage(TextStage.Params()), [{"txt": "a red circle on a dark background"}])

Each sample is a dict of tar members by extension (``txt``, ``jpg``, ``json``...; ``json`` may be
a dict) and an optional ``key``. The index stage runs first, then ``earlier`` stages, then the
stage; every table is built by the same code as in a real run (schema, decision columns).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, cast

import pyarrow as pa

from curate.io.shards import RawSample
from curate.contract.base import MapStage, RunInfo, ShardContext, Stage


def raw_samples(samples: list[dict[str, Any]]) -> list[RawSample]:
    out = []
    for i, s in enumerate(samples):
        members = {}
        for ext, v in s.items():
            if ext == "key":
                continue
            members[ext] = json.dumps(v).encode() if isinstance(v, dict) else v.encode() if isinstance(v, str) else v
        out.append(RawSample(key=str(s.get("key", f"{i:06d}")), members=members))
    return out


@dataclass
class MemoryShardContext(ShardContext):
    """A ShardContext whose shard and earlier tables live in memory."""

    raw: list[RawSample] = field(default_factory=list)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    stages: dict[str, Stage] = field(default_factory=dict)

    def pipeline_stage(self, stage_id: str) -> Stage:
        return self.stages[stage_id]

    def cache_file(self, name: str) -> None:
        return None

    def describe(self, stage_id: str) -> dict[str, Any]:
        return self.stages[stage_id].describe()

    def _table(self, stage_id: str, columns: list[str] | None) -> pa.Table:
        t = self.tables[stage_id]
        return t.select(columns) if columns is not None else t

    def samples(self) -> Iterator[RawSample]:
        return iter(self.raw)

    def samples_at(self, rows: list[int]) -> Iterator[tuple[int, RawSample]]:
        return ((i, self.raw[i]) for i in sorted(rows))


def run_in_memory(stage: MapStage, samples: list[dict[str, Any]], earlier: Sequence[Stage] = (),
                  device: str = "cpu", model_cache: str | None = None) -> pa.Table:
    """The table ``stage`` writes for these samples, after the index and ``earlier`` map stages."""
    from curate.runner.execute import finalize
    from curate.stages.index import IndexStage

    raw = raw_samples(samples)
    run = RunInfo(run_id="memory", workdir=".", device=device, model_cache=model_cache)
    tables: dict[str, pa.Table] = {}
    upstream: list[str] = []
    stages = [IndexStage(IndexStage.Params()), *earlier, stage]
    for st in stages:
        ctx = MemoryShardContext(shard_path="<memory>", shard="memory", stage_id=st.stage_id,
                                 upstream=list(upstream), run=run, evaluate_all=st.evaluate_all,
                                 reads=tuple(st.reads()), raw=raw, tables=tables,
                                 stages={s.stage_id: s for s in stages})
        table = finalize(st, ctx, cast(MapStage, st).process(ctx))[0]
        tables[st.stage_id] = table
        if st.filters:
            upstream.append(st.stage_id)
    return tables[stage.stage_id]
