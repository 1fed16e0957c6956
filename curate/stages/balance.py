"""Concept-balanced resampling (MetaCLIP): cap each concept's share, keep the tail.

summarize: the vocabulary entries each surviving caption matches (whole phrases, one
Aho-Corasick pass, MetaCLIP's normalisation). combine: per-entry counts over the pool;
``p_e = min(1, t / count_e)``; a sample is kept when ``hash(uid, seed) < 1 - prod(1 - p_e)``, so the
result does not depend on sharding or worker count. ``t`` is set, or solved for a target size.
No upsampling: DataComp's appendix saw CLIP training diverge when balancing by repetition.

``per_language`` (MetaCLIP 2): entries are counted per caption language (``lang_final`` of a text
stage), and each language gets its own cap: the cap that keeps the same tail share of its matches
as ``t`` keeps of the reference language's (``tail_share``: sum of min(count, t) over the sum of
counts), so a language with a small pool is not cut at English's cap.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from curate.algorithms.concepts import get_matcher, load_vocabulary
from curate.algorithms.sampling import uniform_hash
from curate.core.config import Strict, require_exactly_one
from curate.io.parquet import read_frame, write_table
from curate.contract.base import GlobalContext, GlobalStage, ShardContext
from curate.contract.registry import register_stage


def tail_share(counts: np.ndarray, t: float) -> float:
    """Share of the matches a cap of t keeps: sum(min(count, t)) / sum(count)."""
    total = counts.sum()
    return float(np.minimum(counts, t).sum() / total) if total else 1.0


def cap_for_share(counts: np.ndarray, share: float) -> float:
    """The cap t whose tail_share over ``counts`` is ``share`` (bisection; the share grows with t)."""
    lo, hi = 0.0, float(max(1.0, counts.max(initial=1.0)))
    if tail_share(counts, hi) <= share:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail_share(counts, mid) < share else (lo, mid)
    return hi


def keep_probability(entries: pl.DataFrame, counts: np.ndarray, t: float | np.ndarray) -> pl.DataFrame:
    """Per sample (column ``row``) ``1 - prod(1 - min(1, t / count_e))`` over its entries (column
    ``entry``: index into ``counts``; ``t`` one cap, or one per entry of ``counts``)."""
    e = entries["entry"].to_numpy()
    c = counts[e]
    p = np.minimum(1.0, (t if np.isscalar(t) else t[e]) / np.maximum(c, 1))
    d = entries.with_columns(pl.Series("log_miss", np.log1p(-np.minimum(p, 1 - 1e-12))))
    # prod(1 - p) through logs; p == 1 makes the sample certain (log_miss ~ -27.6)
    return d.group_by("row").agg(pl.col("log_miss").sum()).with_columns(
        (1.0 - pl.col("log_miss").exp()).alias("p_keep"))


@register_stage
class BalanceStage(GlobalStage):
    """MetaCLIP concept balancing: caps each concept of the vocabulary at t matches; keeps a sample with p = hash(uid, seed) < p_keep."""

    name = "balance"
    columns = {
        "concepts": "ids of the vocabulary entries the caption matches (names: WORK/global/concept_counts.parquet)",
        "p_keep": "keep probability from the concept counts (a sample is kept when hash(uid, seed) < p_keep)",
    }
    version = "2"

    class Params(Strict):
        vocabulary: str = Field("imagenet21k", description="imagenet21k, imagenet1k or a file (one entry a line; lines starting with # are comments)")
        case_sensitive: bool = Field(True, description="MetaCLIP matches case-sensitively")
        t: float | None = Field(None, gt=0, description="per-entry cap (MetaCLIP: 20k for 400M)")
        target_size: int | None = Field(None, ge=1, description="or solve t for this expected size")
        unmatched: Literal["drop", "keep", "sample"] = Field("drop", description="samples that match no concept: drop, keep, or sample at unmatched_rate")
        unmatched_rate: float = Field(0.0, ge=0, le=1, description="keep rate when unmatched: sample")
        seed: int = Field(0, description="seed of the hash(uid, seed) keep decisions")
        per_language: bool = Field(False, description="MetaCLIP 2: count entries per caption language and cap "
                                   "each language at the t that keeps the reference language's tail share")
        language_from: str = Field("text", description="id of the text stage whose lang_final gives the language")
        reference_language: str = Field("en", description="the language t (or the solved t) applies to")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @model_validator(mode="after")
        def _one_rule(self):
            require_exactly_one(self, "t", "target_size")
            return self

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("concepts", pa.list_(pa.int32())), pa.field("p_keep", pa.float32())]

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string()), pa.field("concepts", pa.list_(pa.int32())),
                pa.field("language", pa.string())]

    def reads(self) -> tuple[str, ...]:
        return (self.params.language_from,) if self.params.per_language else ()

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return {"vocabulary_sha256": load_vocabulary(self.params.vocabulary).sha256}

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        m = get_matcher(self.params.vocabulary, self.params.case_sensitive)
        idx = ctx.index(["uid", "caption"])
        ev = ctx.evaluate
        uids = idx.column("uid").to_pylist()
        caps = idx.column("caption").to_pylist()
        rows = [i for i in range(len(uids)) if ev[i]]
        langs = ctx.column("lang_final", rows, stage_id=self.params.language_from) if self.params.per_language \
            else [None] * len(rows)
        return {"uid": [uids[i] for i in rows], "concepts": [m.match(caps[i]) for i in rows], "language": langs}

    def _unmatched_p(self) -> float:
        return {"drop": 0.0, "keep": 1.0, "sample": self.params.unmatched_rate}[self.params.unmatched]

    def caps(self, t: float, counts: np.ndarray, n_entries: int, languages: list[str]) -> np.ndarray:
        """The cap of every (language, entry) slot of ``counts``: t for one language (or without
        per_language); else t for the reference language and, for each other language, the cap
        that keeps the same tail share of its matches."""
        if len(languages) == 1 and not self.params.per_language:
            return np.full(len(counts), t)
        by_lang = counts.reshape(len(languages), n_entries)
        ref = self.params.reference_language
        share = tail_share(by_lang[languages.index(ref)], t) if ref in languages else None
        caps = [t if lang == ref or share is None else cap_for_share(c, share) for lang, c in zip(languages, by_lang)]
        return np.repeat(np.array(caps, dtype=np.float64), n_entries)

    def solve_t(self, entries: pl.DataFrame, counts: np.ndarray, n_unmatched: int, target: int,
                n_entries: int, languages: list[str]) -> float:
        """Smallest t whose expected kept count reaches ``target`` (bisection; E grows with t)."""
        base = n_unmatched * self._unmatched_p()

        def expected(t: float) -> float:
            return keep_probability(entries, counts, self.caps(t, counts, n_entries, languages))["p_keep"].sum() + base

        lo, hi = 1e-6, float(max(1, counts.max(initial=1)))
        if expected(hi) <= target:
            return hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid) < target else (lo, mid)
        return hi

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        """Two streaming passes over the partials, one shard in memory at a time: the pool's
        (row, entry) matches as integers (counts, t, keep probabilities), then per shard the uid
        coins and that shard's results. Memory: the matches as two int64 columns (16 bytes a
        match), a few per-sample arrays (~18 bytes a sample), and polars' temporaries while the
        matches are grouped by row (together ~150 bytes a sample at the peak)."""
        p = self.params
        vocab = load_vocabulary(p.vocabulary)
        v = len(vocab.entries)
        langs_seen: dict[str, int] = {}
        rows_per_shard, ent_rows, ent_ids = [], [], []
        start = 0
        for path in ctx.partials():  # pass 1: matches as (row, language * v + entry)
            d = read_frame(path, columns=["concepts", "language"])
            lang = (d["language"].fill_null("und") if p.per_language else pl.repeat("", d.height, eager=True))
            codes = np.array([langs_seen.setdefault(x, len(langs_seen)) for x in lang.to_list()], dtype=np.int64)
            e = d.select(pl.col("concepts"), pl.int_range(pl.len(), dtype=pl.Int64).alias("row")).explode("concepts") \
                .drop_nulls()
            r = e["row"].to_numpy()
            ent_rows.append(r + start)
            ent_ids.append(e["concepts"].to_numpy().astype(np.int64) + codes[r] * v if len(r) else np.zeros(0, np.int64))
            rows_per_shard.append(d.height)
            start += d.height
        n = start
        # language slots in sorted order, as the per-language caps are reported
        languages = sorted(langs_seen) or [""]
        remap = np.array([languages.index(x) for x in sorted(langs_seen, key=langs_seen.get)], dtype=np.int64)
        ids = np.concatenate(ent_ids) if ent_ids else np.zeros(0, np.int64)
        ids = remap[ids // v] * v + ids % v if len(ids) else ids
        entries = pl.DataFrame({"row": np.concatenate(ent_rows) if ent_rows else np.zeros(0, np.int64), "entry": ids})
        del ent_rows, ent_ids, ids
        counts = np.bincount(entries["entry"].to_numpy(), minlength=v * len(languages)).astype(np.float64)
        matched = np.zeros(n, dtype=bool)
        matched[entries["row"].to_numpy()] = True
        n_unmatched = int(n - matched.sum())
        t = p.t if p.t is not None else self.solve_t(entries, counts, n_unmatched, p.target_size, v, languages)
        caps = self.caps(t, counts, v, languages)
        pk = keep_probability(entries, counts, caps)
        p_keep = np.full(n, self._unmatched_p())
        p_keep[pk["row"].to_numpy()] = pk["p_keep"].to_numpy()
        del pk
        kept = np.zeros(n, dtype=bool)
        with self.results_writer(ctx) as put:  # pass 2: per shard, the coins and its results
            start = 0
            for shard, path, m in zip(ctx.shards, ctx.partials(), rows_per_shard):
                d = read_frame(path, columns=["uid", "concepts"])
                pk_s = p_keep[start:start + m]
                k = pk_s >= 1.0
                # the coin decides only where 0 < p_keep < 1 (coin is in [0, 1)): hashed there alone
                toss = np.flatnonzero((pk_s > 0.0) & (pk_s < 1.0))
                uids = d["uid"].gather(toss).to_list()
                k[toss] = np.array([uniform_hash(u, p.seed) for u in uids], dtype=np.float64) < pk_s[toss]
                kept[start:start + m] = k
                reason = (pl.when(pl.Series(k)).then(pl.lit(None, dtype=pl.String))
                          .when(pl.Series(matched[start:start + m])).then(pl.lit("balance:head"))
                          .otherwise(pl.lit("balance:no_concept")))
                put(shard, d.with_columns(pl.Series("p_keep", pk_s), reason.alias("reason")))
                start += m
        er = entries["row"].to_numpy()
        after = np.bincount(entries["entry"].to_numpy()[kept[er]], minlength=len(counts))
        present = np.flatnonzero(counts > 0)
        concept_counts = pl.DataFrame({"entry_id": (present % v).astype(np.int32),
                                       "entry": [vocab.entries[i % v] for i in present],
                                       "language": [languages[i // v] or None for i in present],
                                       "count_before": counts[present].astype(np.int64),
                                       "count_after": after[present].astype(np.int64),
                                       "p_entry": np.minimum(1.0, caps[present] / counts[present])},
                                      schema_overrides={"language": pl.String})
        write_table(concept_counts.to_arrow(), ctx.work.global_artifact("concept_counts"))
        out = {"t": t, "samples": n, "kept": int(kept.sum()), "unmatched": n_unmatched,
               "expected_kept": float(p_keep.sum()), "head_tail": head_tail(counts, after)}
        if p.per_language:
            out["t_by_language"] = {lang: float(caps[k * v]) for k, lang in enumerate(languages)}
        return out

    def format_summary(self, s: dict[str, Any]) -> list[str]:
        ht = s.get("head_tail", {})
        return [f"{self.stage_id}: t={s.get('t'):.4g}, kept {s.get('kept')} of {s.get('samples')}; "
                f"top 1% of concepts hold {ht.get('top1pct_share_before', 0):.1%} of matches before, "
                f"{ht.get('top1pct_share_after', 0):.1%} after; concepts present "
                f"{ht.get('concepts_present_before')} -> {ht.get('concepts_present_after')}"]


def head_tail(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Share of all matches held by the top 1 % of concepts, and concepts with >= 1 sample."""
    def top_share(c: np.ndarray) -> float:
        c = np.sort(c[c > 0])[::-1]
        if not len(c):
            return 0.0
        k = max(1, int(np.ceil(0.01 * len(c))))
        return float(c[:k].sum() / c.sum())

    return {"top1pct_share_before": round(top_share(before), 4), "top1pct_share_after": round(top_share(after), 4),
            "concepts_present_before": int((before > 0).sum()), "concepts_present_after": int((after > 0).sum())}
