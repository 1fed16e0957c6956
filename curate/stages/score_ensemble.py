"""Combine several scorers into one score per pair (DFN-style filtering networks, ensembles of
CLIP models): rank average, mean z-score, or the minimum z-score of the inputs over the whole
pool. ``clip_rank`` then ranks ``ensemble_score`` (``scores_from: <this stage>``).

summarize: per shard, each input score of the surviving rows. combine: pool-wide ranks (average
for ties) or z-scores of every input, combined per pair; a pair missing any input gets none.
"""
from __future__ import annotations

from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io.parquet import read_frame
from curate.contract.base import GlobalContext, GlobalStage, ShardContext
from curate.contract.registry import register_stage


class ScoreInput(Strict):
    stage: str = Field(description="id of the stage holding the score (e.g. a clip_score stage)")
    column: str = Field("clip_score", description="its score column")


@register_stage
class ScoreEnsembleStage(GlobalStage):
    """One score from several scorers (rank mean, mean z-score or min z-score over the pool)."""

    name = "score_ensemble"
    filters = False
    version = "1"
    columns = {"ensemble_score": "the inputs' pool-wide ranks (0-1) or z-scores, combined by the rule"}

    class Params(Strict):
        inputs: list[ScoreInput] = Field(min_length=2, description="the scores to combine")
        rule: Literal["rank_mean", "zscore_mean", "zscore_min"] = Field(
            "rank_mean", description="rank_mean: mean of pool-wide ranks scaled to 0-1; zscore_mean / "
            "zscore_min: mean or minimum of pool-wide z-scores (min: a pair must do well for every scorer)")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

    def reads(self) -> tuple[str, ...]:
        return tuple(sorted({i.stage for i in self.params.inputs}))

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("ensemble_score", pa.float64())]

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string())] + [pa.field(f"s{k}", pa.float64()) for k in range(len(self.params.inputs))]

    def format_summary(self, s: dict[str, Any]) -> list[str]:
        return [f"{self.stage_id}: {self.params.rule} of {len(self.params.inputs)} scores over {s.get('scored')} "
                f"pairs ({s.get('missing')} missing a score)"]

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        rows = ctx.rows()
        out: dict[str, Any] = {"uid": ctx.column("uid", rows)}
        for k, inp in enumerate(self.params.inputs):
            out[f"s{k}"] = ctx.column(inp.column, rows, stage_id=inp.stage)
        return out

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        frames = [read_frame(p).with_columns(pl.lit(s).alias("shard")) for s, p in zip(ctx.shards, ctx.partials())]
        df = pl.concat(frames).sort("uid") if frames else pl.DataFrame(schema={"uid": pl.String, "shard": pl.String})
        cols = [f"s{k}" for k in range(len(self.params.inputs))]
        complete = df.drop_nulls(cols) if df.height else df
        if self.params.rule == "rank_mean":
            n = max(complete.height - 1, 1)
            parts = [(pl.col(c).rank("average") - 1) / n for c in cols]
            score = pl.mean_horizontal(parts)
        else:
            parts = [(pl.col(c) - pl.col(c).mean()) / pl.col(c).std() for c in cols]
            score = pl.mean_horizontal(parts) if self.params.rule == "zscore_mean" else pl.min_horizontal(parts)
        scored = complete.select("uid", score.alias("ensemble_score")) if complete.height else \
            pl.DataFrame(schema={"uid": pl.String, "ensemble_score": pl.Float64})
        out = df.select("uid", "shard").join(scored, on="uid", how="left").with_columns(
            pl.lit(None, dtype=pl.String).alias("reason"))
        self.write_results(ctx, out)
        return {"scored": complete.height, "missing": df.height - complete.height, "rule": self.params.rule}
