"""The Arrow schemas every table is written with: never inferred from data."""
from __future__ import annotations

import pyarrow as pa

UID = pa.field("uid", pa.string(), nullable=False)

STATS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("metric", pa.string()),
    pa.field("value", pa.float64()),
])


def keep_field(stage_id: str) -> pa.Field:
    return pa.field(f"keep_{stage_id}", pa.bool_())


def reason_field(stage_id: str) -> pa.Field:
    return pa.field(f"reason_{stage_id}", pa.string())


def stage_schema(stage_id: str, values: list[pa.Field], filters: bool) -> pa.Schema:
    """uid, then the stage's value columns, then its decision columns when it filters."""
    fields = [UID, *values]
    if filters:
        fields += [keep_field(stage_id), reason_field(stage_id)]
    return pa.schema(fields)
