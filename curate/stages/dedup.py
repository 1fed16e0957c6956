"""Deduplication (global stage): exact, perceptual (pHash), semantic (SemDeDup), caption near
duplicates (MinHash LSH, algorithms/minhash.py) and eval-set copies.

summarize: per shard, the keys of the surviving samples (sha256, normalised-caption hash, url
hash, pHash, CLIP score). combine: duplicate edges of every enabled kind, groups as connected components
(transitive, order-free), one sample kept per group (highest CLIP score, else smallest uid), and
eval-set matches; written per shard under ``WORK/global/dedup/``. apply: join by uid.

Semantic dedup follows SemDeDup: spherical k-means (faiss) on the stored CLIP image embeddings,
then within each cluster the pairs with cosine above ``1 - eps``. Embeddings are streamed shard by
shard into one file per cluster, so memory is bounded by the largest cluster, not the pool;
clusters above ``max_cluster_size`` are split by k-means, recursively, into leaves of about the same
size at any pool size, so the search stays near-linear in the pool (see ``split_k``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from curate.algorithms import dedup_parts, semdedup
from curate.algorithms.components import component_roots, representatives
from curate.algorithms.eval_sets import eval_matches, source_files
from curate.algorithms.exact_keys import exact_pairs, key_hash
from curate.algorithms.minhash import caption_pairs, signatures_or_none
from curate.algorithms.near_copies import crop_pairs, phash_pairs
from curate.core.config import Strict
from curate.io.parquet import read_frame
from curate.contract.base import GlobalContext, GlobalStage, ShardContext, Stage
from curate.contract.registry import register_stage
from curate.stages.text import normalise

log = logging.getLogger(__name__)
KIND_RANK = {"exact": 0, "phash": 1, "crop": 2, "semantic": 3, "caption_near": 4}
PART_ROWS = 4_000_000  # samples per combine part by default: a part's keys then take ~1 GB


def caption_key(caption: str | None) -> str | None:
    """NFKC, case-folded, whitespace collapsed; None for a caption with no text (blank captions
    are missing text, not copies of each other)."""
    key = normalise(caption).casefold() if caption else None
    return key or None


@register_stage
class DedupStage(GlobalStage):
    """Duplicate groups (exact sha256/caption/url, pHash within a Hamming radius, SemDeDup, caption MinHash, evaluation-set copies); keeps one per group."""

    name = "dedup"
    columns = {
        "dup_group": "uid of the sample kept from this sample's duplicate group (its own uid when it has no duplicate)",
        "dup_of": "uid of the sample this one duplicates (the one kept), null for the kept one",
    }
    version = "8"

    class Params(Strict):
        exact: list[Literal["image", "image_caption", "caption", "url"]] = Field(
            ["image"], description="keys that define an exact duplicate (image: sha256 of the bytes)")
        phash_radius: int | None = Field(4, ge=0, le=16, description="Hamming radius; null: off")
        crop_radius: int | None = Field(None, ge=0, le=16, description="crop-tolerant near duplicates: Hamming "
                                        "radius between one image's pHash and another's crop-window pHashes (centre crops, and side crops "
                                        "of one, two adjacent or two opposite sides); null: off")
        crop_max_color_diff: float = Field(4.0, ge=0, le=255, description="a crop match counts only when the 4x4 "
                                           "colour signatures differ by at most this (mean absolute, 0-255)")
        semantic_eps: float | None = Field(None, gt=0, lt=1, description="SemDeDup: cosine > 1 - eps")
        caption_jaccard: float | None = Field(None, gt=0, le=1, description="caption near duplicates (templated "
                                              "spam): estimated Jaccard similarity of character shingles at "
                                              "or above which two captions match (MinHash LSH); null: off")
        caption_shingle: int = Field(5, ge=1, le=64, description="characters per caption shingle")
        caption_num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations per caption")
        n_clusters: int | None = Field(None, ge=1, description="top-level k-means; null: pool / 200k (each fits in memory)")
        max_cluster_size: int = Field(1000, ge=2, description="larger clusters are split by k-means, recursively")
        semantic_boundary: float = Field(0.02, ge=0, le=2, description="SemDeDup: a row whose similarity to a "
                                         "second centroid is within this of its nearest's is searched in both "
                                         "clusters, so copies on either side of a border still meet; 0: hard "
                                         "assignment as in the SemDeDup paper (it misses such pairs)")
        kmeans_sample: int = Field(200_000, ge=100, description="rows sampled to train the SemDeDup top-level k-means")
        keep: Literal["clip_score", "smallest_uid"] = Field("clip_score", description="which sample of a duplicate group stays: highest CLIP score, or smallest uid")
        eval_sets: list[str] = Field(default_factory=list, description="folders of images or shards")
        eval_embeddings: str | None = Field(None, description=".npy of eval image embeddings (same model)")
        eval_min_cosine: float = Field(0.95, gt=0, le=1, description="image-embedding cosine at or above which a sample copies an evaluation image")
        seed: int = Field(0, description="seed of the k-means initialisation")
        phash_from: str | None = Field("image", description="id of the image stage whose pHash the near-duplicate "
                                       "search reads (null, or absent from the pipeline: no pHash)")
        scores_from: str | None = Field("clip_score", description="id of the clip_score stage whose scores pick "
                                        "the sample a group keeps (null, or absent: smallest uid)")
        embeddings_from: str | None = Field("clip_score", description="id of the clip_score stage whose image "
                                            "embeddings semantic dedup and eval_embeddings read")
        partitions: int | None = Field(None, ge=1, description="tasks the exact and pHash searches are split "
                                       "over (by key hash), each holding its share of the pool; null: one per "
                                       f"{PART_ROWS:,} samples. Only with exact and pHash kinds (the others need "
                                       "the whole pool in one task)")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        def partitionable(self) -> bool:
            return (self.crop_radius is None and self.semantic_eps is None and self.caption_jaccard is None
                    and not self.eval_sets and not self.eval_embeddings)

        @model_validator(mode="after")
        def _partitions_need_key_kinds(self):
            if (self.partitions or 1) > 1 and not self.partitionable():
                raise ValueError("partitions > 1 works with the exact and pHash kinds only; crop_radius, "
                                 "semantic_eps, caption_jaccard and eval sets need the whole pool in one task "
                                 "(set partitions: 1 or null)")
            return self

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("dup_group", pa.string()), pa.field("dup_of", pa.string())]

    _INPUTS = ("phash_from", "scores_from", "embeddings_from")

    def with_earlier(self, earlier: list[Stage]) -> "DedupStage":
        """Inputs left at their default that the pipeline does not have are switched off (null);
        an input named explicitly must exist (reads() then fails the pipeline check)."""
        ids = {s.stage_id for s in earlier}
        off = {k: None for k in self._INPUTS
               if k not in self.params.model_fields_set and getattr(self.params, k) not in ids}
        return type(self)(self.params.model_copy(update=off), self.stage_id) if off else self

    def _phash_source(self) -> str | None:
        p = self.params
        return p.phash_from if p.phash_radius is not None or p.crop_radius is not None else None

    def _score_source(self) -> str | None:
        return self.params.scores_from if self.params.keep == "clip_score" else None

    def _embedding_source(self) -> str | None:
        p = self.params
        return p.embeddings_from if p.semantic_eps is not None or p.eval_embeddings else None

    def reads(self) -> tuple[str, ...]:
        found = (self._phash_source(), self._score_source(), self._embedding_source())
        return tuple(sorted({s for s in found if s}))

    def reads_from(self, stage: Stage) -> set[str]:
        if stage.stage_id != self._phash_source():
            return set()
        return {"phash"} | ({"phash_crops", "color_sig"} if self.params.crop_radius is not None else set())

    def format_summary(self, s: dict[str, Any]) -> list[str]:
        return [f"{self.stage_id}: {s.get('groups')} duplicate groups, edges {s.get('edges')}, dropped {s.get('dropped')}"]

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string()), pa.field("sha256", pa.string()), pa.field("caption_h", pa.int64()),
                pa.field("url_h", pa.int64()), pa.field("phash", pa.int64()), pa.field("clip_score", pa.float32()),
                pa.field("phash_crops", pa.list_(pa.int64())), pa.field("color_sig", pa.list_(pa.uint8())),
                pa.field("caption_mh", pa.list_(pa.uint32()))]

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        sources = self.params.eval_sets + ([self.params.eval_embeddings] if self.params.eval_embeddings else [])
        return {"eval_files": source_files(sources)}

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        idx = ctx.index(["uid", "sha256", "caption", "url"])
        ev = ctx.evaluate
        n = idx.num_rows
        ph = ctx.column("phash", stage_id=self._phash_source()) if self._phash_source() else [None] * n
        cs = ctx.column("clip_score", stage_id=self._score_source()) if self._score_source() else [None] * n
        crops = sig = [None] * n
        if self._phash_source() and self.params.crop_radius is not None:
            crops = ctx.column("phash_crops", stage_id=self._phash_source())
            sig = ctx.column("color_sig", stage_id=self._phash_source())
        rows = [i for i in range(n) if ev[i]]
        col = {k: idx.column(k).to_pylist() for k in ("uid", "sha256", "caption", "url")}
        mh: list = [None] * len(rows)
        if self.params.caption_jaccard is not None:
            mh = signatures_or_none([caption_key(col["caption"][i]) for i in rows], self.params.caption_shingle,
                                    self.params.caption_num_perm)
        return {"uid": [col["uid"][i] for i in rows], "sha256": [col["sha256"][i] for i in rows],
                "caption_h": [key_hash(caption_key(col["caption"][i])) for i in rows],
                "url_h": [key_hash(col["url"][i]) for i in rows], "phash": [ph[i] for i in rows],
                "clip_score": [cs[i] for i in rows], "phash_crops": [crops[i] for i in rows],
                "color_sig": [sig[i] for i in rows], "caption_mh": mh}

    # -- combine -----------------------------------------------------------------------------
    def combine_parts(self, ctx: GlobalContext) -> int:
        p = self.params
        if not p.partitionable() or p.partitions == 1:
            return 0
        parts = p.partitions or math.ceil(dedup_parts.pool_rows(ctx.partials()) / PART_ROWS)
        return parts if parts > 1 else 0

    def combine_part(self, ctx: GlobalContext, part: int, parts: int) -> pa.Table:
        return dedup_parts.part_edges(ctx.partials(), self.params.exact, self.params.phash_radius if
                                      self._phash_source() else None, part, parts,
                                      KIND_RANK["exact"], KIND_RANK["phash"])

    def _combine_from_parts(self, ctx: GlobalContext, parts: int) -> dict[str, Any]:
        """The groups from the parts' edge lists (see dedup_parts): same results as ``combine``'s
        one-task path, written for the grouped samples only (apply gives the others nulls)."""
        out, summary = dedup_parts.groups_from_parts(ctx.partials(), ctx.shards, ctx.parts(parts), KIND_RANK,
                                                     scored=self.params.keep == "clip_score")
        self.write_results(ctx, out)
        return summary | {"partitions": parts}

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        parts = self.combine_parts(ctx)
        if parts:
            return self._combine_from_parts(ctx, parts)
        shard_type = pl.Enum(ctx.shards)  # 4 bytes a row, not a string
        columns = self._partial_columns()
        frames = [read_frame(path, columns=columns).with_columns(pl.lit(shard, dtype=shard_type).alias("shard"))
                  for shard, path in zip(ctx.shards, ctx.partials())]
        df = pl.concat(frames, rechunk=False) if frames else pl.DataFrame()
        del frames
        df = df.sort("uid")  # row ids independent of shard order and worker count
        n = df.height
        kind = np.full(n, 99, dtype=np.int64)  # best edge kind that touched each row
        counts = dict.fromkeys(KIND_RANK, 0)
        edges: list[np.ndarray] = []
        for k, find in self._pair_finders(ctx).items():
            pairs = find(df) if n else np.zeros((0, 2), dtype=np.int64)
            counts[k] += len(pairs)
            if len(pairs):
                edges.append(pairs)
                for c in (pairs[:, 0], pairs[:, 1]):
                    np.minimum.at(kind, c, KIND_RANK[k])
        p = self.params
        eval_hit = eval_matches(df, p.eval_sets, p.phash_radius, p.eval_embeddings, p.eval_min_cosine,
                                self._embeddings_by_shard(ctx, df) if self._embedding_source() else None)
        roots = component_roots(n, np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64))
        score = df["clip_score"].fill_null(-np.inf).to_numpy() if p.keep == "clip_score" else None
        keep_row = representatives(roots, score)[roots]  # the row each row's group keeps
        in_group = np.bincount(roots, minlength=n)[roots] > 1
        out = dedup_parts.group_table(df["uid"], df["shard"], roots, keep_row, kind, eval_hit, list(KIND_RANK))
        del df
        self.write_results(ctx, out)
        dropped = out.filter(pl.col("reason").is_not_null())
        return {"samples": n, "edges": counts, "groups": int(np.count_nonzero(in_group & (roots == np.arange(n)))),
                "dropped": dict(dropped.group_by("reason").len().iter_rows())}

    def _partial_columns(self) -> list[str]:
        """The partial's columns this configuration reads (the others are never loaded)."""
        p = self.params
        cols = {"uid", "clip_score"}
        cols |= {"sha256" for k in p.exact if k in ("image", "image_caption")}
        cols |= {"sha256"} if p.eval_sets else set()  # the eval-set checks: exact bytes, then pHash
        cols |= {"phash"} if p.phash_radius is not None or p.crop_radius is not None else set()
        cols |= {"caption_h" for k in p.exact if k in ("caption", "image_caption")}
        cols |= {"url_h" for k in p.exact if k == "url"}
        cols |= {"phash_crops", "color_sig"} if p.crop_radius is not None else set()
        cols |= {"caption_mh"} if p.caption_jaccard is not None else set()
        return [f.name for f in self.partial_fields() if f.name in cols]

    def _pair_finders(self, ctx: GlobalContext) -> dict[str, Callable[[pl.DataFrame], np.ndarray]]:
        """Each enabled kind's pair search over the combine table (rows sorted by uid), by kind."""
        p = self.params
        found: dict[str, Callable[[pl.DataFrame], np.ndarray]] = {}
        if p.exact:
            found["exact"] = lambda df: exact_pairs(df, list(p.exact))
        if p.phash_radius is not None:
            found["phash"] = lambda df: phash_pairs(df, p.phash_radius)
        if p.crop_radius is not None:
            found["crop"] = lambda df: crop_pairs(df, p.crop_radius, p.crop_max_color_diff)
        if p.semantic_eps is not None:
            found["semantic"] = lambda df: self._semantic_pairs(ctx, df)
        if p.caption_jaccard is not None:
            found["caption_near"] = lambda df: caption_pairs(df, p.caption_jaccard)
        return found

    def _semantic_pairs(self, ctx: GlobalContext, df: pl.DataFrame) -> np.ndarray:
        p = self.params
        if self._embedding_source() is None:
            log.warning("%s: semantic dedup needs image embeddings (a clip_score stage before it); skipped",
                        self.stage_id)
            return np.zeros((0, 2), dtype=np.int64)
        rows_of = shard_rows(df, ctx.shards)

        def shard_embeddings(k: int, unit_length: bool) -> tuple[np.ndarray, np.ndarray]:
            return self._shard_embeddings(ctx, ctx.shards[k], rows_of(k), unit_length)

        return semdedup.pool_pairs(df["uid"], shard_embeddings, len(ctx.shards),
                                   ctx.work.scratch(f"{ctx.stage_id}_clusters"), min_cos=1.0 - p.semantic_eps,
                                   max_cluster_size=p.max_cluster_size, seed=p.seed, boundary=p.semantic_boundary,
                                   n_clusters=p.n_clusters, kmeans_sample=p.kmeans_sample)

    def _embeddings_by_shard(self, ctx: GlobalContext, df: pl.DataFrame):
        rows_of = shard_rows(df, ctx.shards)
        return lambda: (self._shard_embeddings(ctx, s, rows_of(k)) for k, s in enumerate(ctx.shards))

    def _shard_embeddings(self, ctx: GlobalContext, shard: str, row_of: dict[str, int], unit_length: bool = True
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(combine rows, image embeddings: unit, or as stored) of one shard's surviving samples."""
        read = ctx.unit_embeddings if unit_length else ctx.stored_embeddings
        uids, emb = read(self._embedding_source(), "image_emb", shard, row_of)
        return np.array([row_of[u] for u in uids], dtype=np.int64), emb


def shard_rows(df: pl.DataFrame, shards: list[str]) -> Callable[[int], dict[str, int]]:
    """For the k-th shard, its samples' combine rows by uid. One shard's map at a time: a map of
    the whole pool's uid strings would cost about 330 MB per million samples."""
    code = df["shard"].to_physical().to_numpy()  # the index in ``shards`` (the Enum's categories)
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(len(shards) + 1))

    def rows_of(k: int) -> dict[str, int]:
        rows = order[bounds[k]:bounds[k + 1]]
        return dict(zip(df["uid"].gather(rows).to_list(), rows.tolist()))

    return rows_of
