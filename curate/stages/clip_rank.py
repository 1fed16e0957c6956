"""clip_rank: one global threshold over a pool's CLIP scores (DataComp's CLIP-score top 30 %).

It keeps the top fraction of the whole pool (one global threshold, ties broken by uid, or
DataComp's own rule with ``datacomp_parity``), the samples above an absolute score, or the samples
above a score calibrated on held-out pairs for this very scorer (``stages/clip_calibration.py``).
The scores come from a ``clip_score`` stage, another scorer's column, or a metadata pool's index.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.core.config import Strict, require_exactly_one
from curate.io import storage
from curate.io.parquet import read_table, write_table
from curate.io.shards import expand_input
from curate.contract.base import GlobalContext, GlobalStage, ShardContext, StageOutput
from curate.models.clip_calibration import Calibration, choose_threshold, heldout_captions, heldout_scores
from curate.contract.registry import register_stage

log = logging.getLogger(__name__)


@register_stage
class ClipRankStage(GlobalStage):
    """One global threshold over the pool's CLIP scores (DataComp's CLIP-score top 30 %)."""

    name = "clip_rank"
    columns = {
        "clip_rank_threshold": "the pool-wide CLIP-score threshold this run applied",
        "rescued": "kept although its own score is below the threshold, because the rescue score (its synthetic "
                   "caption's) reaches it; export writes the synthetic caption as its .txt (rescue_from only)",
    }
    version = "2"

    class Params(Strict):
        scores_from: str = Field("clip_score", description="id of the stage whose scores are ranked (a clip_score "
                                 "stage; or index, for the scores a metadata pool carries)")
        score_column: str = Field("clip_score", description="the column of that stage to rank, e.g. "
                                  "clip_l14_similarity_score of a DataComp metadata pool")
        datacomp_parity: bool = Field(False, description="top_fraction as DataComp's get_threshold computes it: "
                                      "n counts every row (a missing or NaN score too), the threshold is the score "
                                      "at index floor(n * f) of the scores sorted descending with NaN last, ties "
                                      "kept, a missing score never kept (default: exactly ceil(n * f) of the "
                                      "scored rows kept, ties broken by uid)")
        top_fraction: float | None = Field(None, gt=0, le=1, description="keep this share of the pool")
        min_score: float | None = Field(None, ge=-1, le=1, description="or keep scores >= this, compared in the "
                                        "column's own type (float32(0.3) for a float32 column, as pandas does; "
                                        "tied to one scorer: prefer calibrate)")
        calibrate: Calibration | None = Field(None, description="or keep scores >= a threshold chosen "
                                              "on held-out pairs scored by this run's CLIP stage")
        exact_max_rows: int = Field(200_000_000, ge=1, description="beyond: histogram threshold")
        hist_bins: int = Field(65536, ge=16, description="bins over [-1, 1]: the histogram threshold, and the "
                               "exact one's first pass (its second pass holds one bin's rows)")
        rescue_from: str | None = Field(None, description="id of a stage with a second score per row (a clip_score "
                                        "stage that scored a recaption stage's captions): a row below the threshold "
                                        "is kept when that score reaches it (rescued); the threshold itself comes from "
                                        "scores_from alone")
        rescue_column: str = Field("clip_score", description="the column of rescue_from to compare")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @model_validator(mode="after")
        def _one_rule(self):
            require_exactly_one(self, "top_fraction", "min_score", "calibrate")
            return self

    def value_fields(self) -> list[pa.Field]:
        rescued = [pa.field("rescued", pa.bool_())] if self.params.rescue_from else []
        return [pa.field("clip_rank_threshold", pa.float32()), *rescued]

    def reads(self) -> tuple[str, ...]:
        return (self.params.scores_from,) + ((self.params.rescue_from,) if self.params.rescue_from else ())

    def index_columns(self) -> set[str]:
        return {self.params.score_column} if self.params.scores_from == "index" else set()

    def format_summary(self, s: dict[str, Any]) -> list[str]:
        lines = [f"{self.stage_id}: threshold {s.get('threshold')} over {s.get('n')} scores of "
                 f"{self.params.scores_from} ({'exact' if s.get('exact') else 'approximate'}, rule {s.get('rule')})"]
        cal = s.get("calibration")
        if cal:
            lines.append(f"  calibrated ({cal['rule']}) on {cal['heldout_pairs']} held-out pairs: keeps "
                         f"{cal['heldout_recall']:.1%} of matched and {cal['heldout_false_accept']:.1%} of "
                         f"shuffled pairs (precision {cal['heldout_precision']}); median score matched "
                         f"{cal['matched_median']}, shuffled {cal['shuffled_median']}")
        return lines

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        cal = self.params.calibrate
        if cal is None:
            return {}
        try:
            shards = expand_input(cal.heldout)
        except Exception:  # reported by preflight and by combine
            shards = []
        return {"heldout": [(p, storage.size(p)) for p in shards]}

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string()), pa.field("clip_score", pa.float64())]

    def preflight(self, model_cache: str | None = None) -> list[str]:
        cal = self.params.calibrate
        if cal is None:
            return []
        try:
            found = len(heldout_captions(expand_input(cal.heldout), 20))
        except Exception as e:  # a missing or unreadable held-out set, named
            return [f"{self.stage_id}: calibrate.heldout: {e}"]
        return [] if found >= 20 else [f"{self.stage_id}: calibrate.heldout {cal.heldout!r} holds {found} "
                                       "usable pair(s); calibration needs at least 20"]

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        """The scores to rank. With ``datacomp_parity`` a row without a score counts in the pool as
        NaN (DataComp's pandas reads a null as NaN and sizes the fraction over every row)."""
        uids = ctx.column("uid")
        scores = ctx.column(self.params.score_column, stage_id=self.params.scores_from)
        ev = ctx.evaluate
        if self.params.datacomp_parity:
            keep = [i for i in range(len(uids)) if ev[i]]
            return {"uid": [uids[i] for i in keep],
                    "clip_score": [math.nan if scores[i] is None else scores[i] for i in keep]}
        keep = [i for i in range(len(uids)) if ev[i] and scores[i] is not None]
        return {"uid": [uids[i] for i in keep], "clip_score": [scores[i] for i in keep]}

    def single_precision(self, ctx: ShardContext) -> bool:
        """Whether the ranked column holds float32 values where the pool stores it: a clip_score
        table, or the metadata Parquet behind the index (which widens scores to float64). An
        absolute ``min_score`` is compared in that type, as pandas compares a column with a float."""
        if self.params.scores_from != "index":
            field = ctx.read(self.params.scores_from, [self.params.score_column]).schema.field(0)
            return field.type == pa.float32()
        if not ctx.shard_path.endswith(".parquet"):
            return False
        import pyarrow.parquet as pq

        from curate.io.storage import open_read

        with open_read(ctx.shard_path) as f:
            schema = pq.read_schema(f)
        i = schema.get_field_index(self.params.score_column)
        return i >= 0 and schema.field(i).type == pa.float32()

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        p = self.params
        edges = np.linspace(-1.0, 1.0, p.hist_bins + 1)
        hist = np.zeros(p.hist_bins, dtype=np.int64)
        n = 0
        for path in ctx.partials():  # pass 1: streaming, bounded memory
            s = read_table(path, columns=["clip_score"]).column(0).to_numpy().astype(np.float64)
            hist += np.histogram(np.clip(s, -1, 1), bins=edges)[0]
            n += len(s)
        art: dict[str, Any] = {"n": n, "rule": "min_score" if p.min_score is not None else
                               "calibrated" if p.calibrate else "top_fraction"}
        if p.min_score is not None:  # apply rounds it to the column's type, shard by shard
            art.update(threshold=float(p.min_score), tie_uid=None, k=None, exact=True)
        elif p.calibrate is not None:
            scorer = ctx.pipeline_stage(self.params.scores_from)
            matched, shuffled = heldout_scores(scorer, p.calibrate, ctx.run.device, ctx.run.model_cache)
            cal = choose_threshold(matched, shuffled, p.calibrate)
            art.update(threshold=cal["threshold"], tie_uid=None, k=None, exact=True, calibration=cal)
            log.info("clip_rank calibrated on %d held-out pairs: %s", cal["heldout_pairs"], cal)
        elif n == 0:
            art.update(threshold=None, tie_uid=None, k=0, exact=True)
        elif p.datacomp_parity:
            # DataComp's get_threshold: every row counts (NaN too), sorted with -np.sort(-x) so NaN
            # comes last; a NaN threshold keeps nothing, as ``score >= NaN`` is false
            s = np.concatenate([read_table(x, columns=["clip_score"]).column(0).to_numpy(zero_copy_only=False)
                                for x in ctx.partials()]).astype(np.float64)
            t = -np.sort(-s)[min(n - 1, math.floor(n * p.top_fraction))]
            art.update(threshold=None if np.isnan(t) else float(t), tie_uid=None, k=None, exact=True,
                       rule="datacomp_top_fraction")
        else:
            k = max(1, math.ceil(p.top_fraction * n))
            art["k"] = k
            if n <= p.exact_max_rows:
                threshold, tie_uid = kth_ranked(ctx.partials(), k, p.hist_bins)
                art.update(threshold=threshold, tie_uid=tie_uid, exact=True)
            else:
                # Approximate: the lower edge of the bin holding the k-th score. Scores kept differ
                # from the exact top-k only inside that one bin: error <= 2 / hist_bins in score,
                # and <= that bin's count in samples (both recorded).
                cum = np.cumsum(hist[::-1])
                b = p.hist_bins - 1 - int(np.searchsorted(cum, k))
                art.update(threshold=float(edges[b]), tie_uid=None, exact=False,
                           score_error_bound=2.0 / p.hist_bins, count_error_bound=int(hist[b]))
        work = ctx.work
        ctx.write_json(ctx.stage_id, art)
        coarse = hist.reshape(-1, p.hist_bins // 256).sum(1) if p.hist_bins % 256 == 0 else hist
        cedges = np.linspace(-1.0, 1.0, len(coarse) + 1)
        write_table(pa.table({"bin_lo": cedges[:-1], "bin_hi": cedges[1:], "count": coarse}),
                    work.global_artifact(f"{ctx.stage_id}_histogram"))
        return art

    def apply(self, ctx: ShardContext) -> StageOutput:
        art = json.loads(ctx.work.global_artifact(ctx.stage_id, ".json").read_text())
        thr, tie = art["threshold"], art["tie_uid"]
        if art["rule"] == "min_score" and self.single_precision(ctx):
            thr = float(np.float32(thr))
        uids = ctx.column("uid")
        scores = ctx.column(self.params.score_column, stage_id=self.params.scores_from)
        ev = ctx.evaluate
        reasons = [None if not e else "clip:no_score" if s is None or s != s else
                   None if ranks_in(s, u, thr, tie) else "clip:below_threshold"
                   for u, s, e in zip(uids, scores, ev)]
        out = StageOutput({"clip_rank_threshold": [thr] * len(uids)}, reasons)
        if self.params.rescue_from:
            second = ctx.column(self.params.rescue_column, stage_id=self.params.rescue_from)
            rescued = [e and r is not None and thr is not None and s2 is not None and s2 == s2 and float(s2) >= thr
                       for e, r, s2 in zip(ev, reasons, second)]
            out.reasons = [None if res else r for r, res in zip(reasons, rescued)]
            out.columns["rescued"] = [bool(res) if e else None for res, e in zip(rescued, ev)]
            ctx.count("rescued", sum(rescued))
        return out


def _score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each score over [-1, 1] (outside values in the end bins; NaN in bin -1, ranked last)."""
    b = np.floor((np.clip(scores, -1.0, 1.0) + 1.0) * (bins / 2.0))
    return np.where(np.isnan(scores), -1, np.minimum(b, bins - 1)).astype(np.int64)


def kth_ranked(partials: list, k: int, bins: int) -> tuple[float, str]:
    """(score, uid) of the k-th pair (1-based) in the order score descending, uid ascending, over
    Parquet files with ``uid`` and ``clip_score``: exact, in two streaming passes. Pass 1 counts
    scores per bin; pass 2 keeps only the rows of the bin that holds the k-th and sorts them. Equal
    scores share a bin, so the order of the rows in other bins does not matter; memory is one
    file's scores plus one bin's rows."""
    counts = np.zeros(bins + 1, dtype=np.int64)  # slot 0: NaN, then the bins
    for path in partials:
        s = read_table(path, columns=["clip_score"]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)
        counts += np.bincount(_score_bins(s, bins) + 1, minlength=bins + 1)
    from_top = np.cumsum(counts[::-1])  # rows in the bins from the top down to each
    slot = bins - int(np.searchsorted(from_top, k))  # the slot holding the k-th row
    above = int(from_top[bins - slot - 1]) if slot < bins else 0
    scores, uids = [], []
    for path in partials:
        t = read_table(path, columns=["uid", "clip_score"])
        s = t.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
        mine = np.flatnonzero(_score_bins(s, bins) + 1 == slot)
        if len(mine):
            scores.append(s[mine])
            uids.append(np.array(t.column("uid").take(mine).to_pylist()))
    s, u = np.concatenate(scores), np.concatenate(uids)
    last = np.lexsort((u, -s))[k - above - 1]  # NaN ranks last, as -NaN sorts last
    return float(s[last]), str(u[last])


def ranks_in(score: float, uid: str, threshold: float | None, tie_uid: str | None) -> bool:
    """The kept set: score above the threshold, or equal to it with a uid not after the tie uid."""
    if threshold is None:
        return False
    score = float(score)
    return score > threshold or (score == threshold and (tie_uid is None or uid <= tie_uid))
