"""The per-row filter: measure a batch of rows, then derive reasons from the value columns and
thresholds (datatrove's filter shape, vectorised).

A subclass implements ``measure`` (value columns for the rows it computes, plus a reason for rows
that could not be measured at all) and ``rules`` (an ordered list of "drop when" expressions over
those columns, each with its reason); the first failing rule is the row's reason. Rules read the
values as the table stores them, so re-thresholding the written Parquet gives the same decisions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import polars as pl
import pyarrow as pa

from curate.contract.base import MapStage, ShardContext, StageOutput
from curate.core.timeouts import TimeLimiter
from curate.io.images import decode_within

log = logging.getLogger(__name__)

# (drop when, reason): the reason is a string or an expression (e.g. "lang:" + the language).
Rule = tuple[pl.Expr, "pl.Expr | str"]


@dataclass
class Measured:
    """Value columns for the measured rows (one entry per row, in order), a reason per row that
    failed before any rule could apply (None: measured), and extra per-row inputs the rules read
    that the table does not keep (e.g. the byte size of an image)."""

    values: dict[str, list[Any]]
    failed: Sequence[str | None] | None = None
    inputs: dict[str, list[Any]] = field(default_factory=dict)


def first_failing(frame: pl.DataFrame, rules: list[Rule], failed: Sequence[str | None] | None = None
                  ) -> list[str | None]:
    """Per row: the failure, else the reason of the first rule whose condition holds, else None.
    A rule over a null value does not fire."""
    exprs = [pl.lit(pl.Series("failed", list(failed), dtype=pl.String))] if failed is not None else []
    exprs += [pl.when(bad.fill_null(False)).then(why if isinstance(why, pl.Expr) else pl.lit(why))
              for bad, why in rules]
    if not exprs or frame.height == 0:
        return [None] * frame.height if failed is None else list(failed)
    return frame.select(pl.coalesce(exprs).alias("reason"))["reason"].to_list()


def measure_images(ctx: ShardContext, rows: list[int], limiter: TimeLimiter, side: int, max_pixels: int,
                   prefix: str, empty: dict[str, Any], measure: Callable[[int, Any], dict[str, Any]]) -> Measured:
    """The per-image loop of a detector filter: each row's image decoded to at most ``side`` pixels
    under the stage's time limit, ``measure(row, rgb)`` gives its values. A row whose image does not
    decode gets ``empty`` values and the decode's reason (``<prefix>:undecodable``...), one the
    detector fails on ``<prefix>:detector_failed`` (logged: one odd image never fails a shard), one
    the tar no longer holds ``<prefix>:missing``."""
    got: dict[int, tuple[dict[str, Any], str | None]] = {}
    for i, s in ctx.samples_at(rows):
        rgb, _, reason = decode_within(limiter, s.image(), s.image_ext(), side, max_pixels, prefix)
        if rgb is None:
            got[i] = (empty, reason)
            continue
        ctx.count("images_decoded")
        try:
            got[i] = (measure(i, rgb), None)
        except Exception as e:  # a reason for this row, never a failed shard
            log.warning("%s: detection failed on row %d of %s: %s", ctx.stage_id, i, ctx.shard, e)
            got[i] = (empty, f"{prefix}:detector_failed")
    measured = [got.get(i, (empty, f"{prefix}:missing")) for i in rows]
    return Measured({k: [m[0][k] for m in measured] for k in empty}, [m[1] for m in measured])


class RowFilter(MapStage):
    """A map filter whose decision for a row depends on that row's measures alone."""

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        """Measure ``rows`` (positions in the index) of the shard."""
        raise NotImplementedError

    def rules(self) -> list[Rule]:
        """Drop conditions over the value columns (and ``Measured.inputs``), in priority order."""
        raise NotImplementedError

    def frame(self, m: Measured) -> pl.DataFrame:
        """The measured values typed as the table stores them, with the extra inputs."""
        schema = {f.name: pl.Series(values=pa.array([], f.type)).dtype for f in self.value_fields()}
        df = pl.DataFrame({k: m.values[k] for k in schema}, schema=schema)
        return df.with_columns(pl.Series(k, v) for k, v in m.inputs.items()) if m.inputs else df

    def reasons(self, m: Measured) -> list[str | None]:
        return first_failing(self.frame(m), self.rules(), m.failed)

    def process(self, ctx: ShardContext) -> StageOutput:
        rows = ctx.rows()
        m = self.measure(ctx, rows)
        return ctx.scatter(m.values, rows, self.reasons(m))
