"""The Arrow schemas every table is written with: never inferred from data."""
from __future__ import annotations

import pyarrow as pa

UID_DOC = "sample id: 32 hex characters (the pool's own uid when its metadata has one, else a hash of shard and key)"
UID = pa.field("uid", pa.string(), nullable=False, metadata={"description": UID_DOC})

STATS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("metric", pa.string()),
    pa.field("value", pa.float64()),
    pa.field("detail", pa.string()),  # text that goes with a metric, e.g. a damaged shard's read error
])


KEEP_DOC = "the stage's decision: true keep, false drop, null not evaluated (dropped by an earlier stage)"
REASON_DOC = "why the stage dropped the sample (e.g. lang:de, image:min_side), null when kept"


def keep_field(stage_id: str) -> pa.Field:
    return pa.field(f"keep_{stage_id}", pa.bool_(), metadata={"description": KEEP_DOC})


def reason_field(stage_id: str) -> pa.Field:
    return pa.field(f"reason_{stage_id}", pa.string(), metadata={"description": REASON_DOC})


def stage_schema(stage_id: str, values: list[pa.Field], filters: bool,
                 docs: dict[str, str] | None = None) -> pa.Schema:
    """uid, then the stage's value columns (each with its description from ``docs`` as field
    metadata, so the Parquet file explains itself), then its decision columns when it filters."""
    docs = docs or {}
    fields = [UID, *(f.with_metadata({"description": docs[f.name]}) if f.name in docs else f for f in values)]
    if filters:
        fields += [keep_field(stage_id), reason_field(stage_id)]
    return pa.schema(fields)
