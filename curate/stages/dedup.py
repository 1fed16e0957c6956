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

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from curate.algorithms.phash import COLOR_CELLS, color_distance, near_pairs
from curate.algorithms.components import component_roots
from curate.algorithms.minhash import signatures, similar_pairs
from curate.algorithms.sampling import sample_share, uid_sample
from curate.algorithms.semdedup import streamed_pairs, top_level_k
from curate.algorithms.vectors import train_centroids
from curate.core.config import Strict
from curate.io.parquet import read_frame
from curate.io.shards import expand_input, iter_samples
from curate.algorithms import dedup_parts
from curate.contract.base import GlobalContext, GlobalStage, ShardContext, Stage
from curate.contract.registry import register_stage
from curate.stages.text import normalise

log = logging.getLogger(__name__)
KIND_RANK = {"exact": 0, "phash": 1, "crop": 2, "semantic": 3, "caption_near": 4}
PART_ROWS = 4_000_000  # samples per combine part by default: a part's keys then take ~1 GB


def key_hash(text: str | None) -> int | None:
    if text is None:
        return None
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


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
        files = []
        for src in self.params.eval_sets + ([self.params.eval_embeddings] if self.params.eval_embeddings else []):
            p = Path(src)
            for f in (sorted(p.rglob("*")) if p.is_dir() else [p]):
                if f.is_file():
                    st = f.stat()
                    files.append((str(f), st.st_size, int(st.st_mtime)))
        return {"eval_files": files}

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
            keyed = [(j, caption_key(col["caption"][i])) for j, i in enumerate(rows)]
            keyed = [(j, k) for j, k in keyed if k]
            for (j, _), hv in zip(keyed, signatures([k for _, k in keyed], self.params.caption_shingle,
                                                    self.params.caption_num_perm)):
                mh[j] = hv
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
        edges, kind = dedup_parts.read_edges(ctx.parts(parts), KIND_RANK["phash"])
        counts = dict.fromkeys(KIND_RANK, 0)
        for k, rank in KIND_RANK.items():
            counts[k] = int((kind == rank).sum())
        out = pl.DataFrame(schema={"uid": pl.String, "shard": pl.Enum(ctx.shards), "dup_group": pl.String,
                                   "dup_of": pl.String, "reason": pl.String})
        groups = 0
        if len(edges):
            rows = dedup_parts.grouped_rows(ctx.partials(), ctx.shards, edges, kind,
                                            scored=self.params.keep == "clip_score")
            groups = rows["root"].n_unique()
            out = dedup_parts.group_results(rows, {r: f"dedup:{k}" for k, r in KIND_RANK.items()})
        self.write_results(ctx, out)
        dropped = out.filter(pl.col("reason").is_not_null())
        return {"samples": dedup_parts.pool_rows(ctx.partials()), "edges": counts, "groups": groups,
                "dropped": dict(dropped.group_by("reason").len().iter_rows()), "partitions": parts}

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        p = self.params
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

        def add_edges(pairs: np.ndarray, k: str) -> None:
            counts[k] += len(pairs)
            if len(pairs):
                edges.append(pairs)
                for c in (pairs[:, 0], pairs[:, 1]):
                    np.minimum.at(kind, c, KIND_RANK[k])

        for key in p.exact:
            cols = {"image": ["sha256"], "image_caption": ["sha256", "caption_h"], "caption": ["caption_h"],
                    "url": ["url_h"]}[key]
            add_edges(equal_key_pairs(df, cols), "exact")
        if p.phash_radius is not None and n:
            ph = df["phash"].to_numpy()
            valid = np.flatnonzero(~df["phash"].is_null().to_numpy())
            pairs = near_pairs(ph[valid], p.phash_radius)
            add_edges(valid[pairs] if len(pairs) else pairs, "phash")
        if p.crop_radius is not None and n:
            add_edges(self._crop_pairs(df), "crop")
        if p.semantic_eps is not None and n:
            add_edges(self._semantic_pairs(ctx, df), "semantic")
        if p.caption_jaccard is not None and n:
            ok = ~df["caption_mh"].is_null().to_numpy()
            rows = np.flatnonzero(ok)
            sig = np.array(df["caption_mh"].filter(ok).to_list(), dtype=np.uint32).reshape(len(rows), -1)
            pairs = similar_pairs(sig, p.caption_jaccard)
            add_edges(rows[pairs] if len(pairs) else pairs, "caption_near")
        eval_hit = self._eval_matches(ctx, df)
        roots = component_roots(n, np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64))
        keep_row = self._representatives(df, roots)[roots]  # the row each row's group keeps
        in_group = np.bincount(roots, minlength=n)[roots] > 1
        is_copy = in_group & (keep_row != np.arange(n)) & ~eval_hit
        # reasons as codes: an edge kind's rank, the eval label after them, -1 for none
        labels = dict(enumerate([f"dedup:{k}" for k in KIND_RANK] + ["dedup:eval"]))
        code = np.where(eval_hit, len(KIND_RANK), np.where(is_copy & (kind < len(KIND_RANK)), kind, -1))
        # built in polars from numpy masks: no Python object per row
        out = pl.DataFrame({"uid": df["uid"], "shard": df["shard"], "_kept": df["uid"].gather(keep_row),
                            "_in": in_group, "_copy": is_copy,
                            "reason": pl.Series(code).replace_strict(labels, default=None, return_dtype=pl.String)}
                           ).select("uid", "shard", pl.when("_in").then("_kept").alias("dup_group"),
                                    pl.when("_copy").then("_kept").alias("dup_of"), "reason")
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

    def _representatives(self, df: pl.DataFrame, roots: np.ndarray) -> np.ndarray:
        """The kept row of each group, indexed by root: highest CLIP score (when configured and
        present), ties by smallest uid (rows are sorted by uid)."""
        score = df["clip_score"].fill_null(-np.inf).to_numpy() if self.params.keep == "clip_score" \
            else np.zeros(df.height)
        rep = np.arange(df.height, dtype=np.int64)  # a row alone is its own root and representative
        grouped = np.flatnonzero(np.bincount(roots, minlength=df.height)[roots] > 1)
        order = grouped[np.lexsort((grouped, -score[grouped], roots[grouped]))]
        if len(order):
            r = roots[order]
            first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # first row of each root in that order
            rep[r[first]] = order[first]
        return rep

    def _crop_pairs(self, df: pl.DataFrame) -> np.ndarray:
        """(row, row) pairs where one image's pHash is within ``crop_radius`` of a centre-crop pHash
        of the other, confirmed by their colour signatures."""
        p = self.params
        ok = ~(df["phash"].is_null() | df["phash_crops"].is_null() | df["color_sig"].is_null()).to_numpy()
        rows = np.flatnonzero(ok)
        if len(rows) < 2:
            return np.zeros((0, 2), dtype=np.int64)
        full = df["phash"].to_numpy()[rows]
        crops = np.array(df["phash_crops"].filter(ok).to_list(), dtype=np.int64)
        # colour signatures: the whole image, then each centre crop
        sig = np.array(df["color_sig"].filter(ok).to_list(), dtype=np.uint8).reshape(len(rows), -1, COLOR_CELLS)
        found = []
        for k in range(crops.shape[1]):
            pr = near_pairs(full, p.crop_radius, other=crops[:, k])
            pr = pr[pr[:, 0] != pr[:, 1]]
            found.append(pr[color_distance(sig[pr[:, 0], 0], sig[pr[:, 1], k + 1]) <= p.crop_max_color_diff])
        pairs = rows[np.concatenate(found)] if found else np.zeros((0, 2), dtype=np.int64)
        if not len(pairs):
            return np.zeros((0, 2), dtype=np.int64)
        return np.unique(np.sort(pairs, axis=1), axis=0).astype(np.int64)

    def _semantic_pairs(self, ctx: GlobalContext, df: pl.DataFrame) -> np.ndarray:
        p = self.params
        if self._embedding_source() is None:
            log.warning("%s: semantic dedup needs image embeddings (a clip_score stage before it); skipped",
                        self.stage_id)
            return np.zeros((0, 2), dtype=np.int64)
        shards = ctx.shards
        rows_of = shard_rows(df, shards)
        # 1) train spherical k-means on a sample drawn by uid, ordered by uid: the same rows in the
        # same order whatever the sharding
        sample, sampled = [], []
        share = sample_share(p.kmeans_sample, df.height)
        for k, s in enumerate(shards):
            rows, emb = self._shard_embeddings(ctx, s, rows_of(k))
            if len(rows):
                uids = df["uid"].gather(rows).to_list()
                pick = uid_sample(uids, p.seed, share)
                sample.append(emb[pick])
                sampled += [u for u, keep in zip(uids, pick) if keep]
        if not sampled:
            return np.zeros((0, 2), dtype=np.int64)
        train = np.concatenate(sample)[np.argsort(sampled, kind="stable")]
        del sample, sampled
        d = train.shape[1]
        k = p.n_clusters or top_level_k(df.height)
        cent = train_centroids(train, k, p.seed)
        del train
        # 2) stream every shard to its top-level cluster's file; 3) search one cluster at a time
        def stored() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for k, s in enumerate(shards):
                yield self._shard_embeddings(ctx, s, rows_of(k), unit_length=False)

        return streamed_pairs(cent, stored(), d, ctx.work.scratch(f"{ctx.stage_id}_clusters"),
                              1.0 - p.semantic_eps, p.max_cluster_size, p.seed, p.semantic_boundary)

    def _eval_matches(self, ctx: GlobalContext, df: pl.DataFrame) -> np.ndarray:
        p = self.params
        hit = np.zeros(df.height, dtype=bool)
        if not p.eval_sets and not p.eval_embeddings:
            return hit
        shas, hashes = load_eval_hashes(p.eval_sets)
        if p.eval_sets:
            hit |= df["sha256"].is_in(list(shas)).fill_null(False).to_numpy()
        if p.phash_radius is not None and len(hashes):
            ph = df["phash"].to_numpy()
            valid = np.flatnonzero(~df["phash"].is_null().to_numpy())
            pairs = near_pairs(ph[valid], p.phash_radius, other=np.array(hashes, dtype=np.int64))
            hit[valid[pairs[:, 0]]] = True if len(pairs) else hit[valid[pairs[:, 0]]]
        if p.eval_embeddings:
            import faiss

            ref = np.load(p.eval_embeddings).astype(np.float32)
            ref /= np.linalg.norm(ref, axis=1, keepdims=True)
            index = faiss.IndexFlatIP(ref.shape[1])
            index.add(ref)
            rows_of = shard_rows(df, ctx.shards)
            for k, s in enumerate(ctx.shards if self._embedding_source() else []):
                rows, emb = self._shard_embeddings(ctx, s, rows_of(k))
                if len(rows):
                    sim, _ = index.search(emb, 1)
                    hit[rows[sim[:, 0] >= p.eval_min_cosine]] = True
        return hit

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


def equal_key_pairs(df: pl.DataFrame, cols: list[str]) -> np.ndarray:
    """Chain every group of rows with equal (non-null) keys: (first, other) pairs."""
    d = df.select(cols).with_row_index("_r").drop_nulls(cols)  # the key columns only: no copy of the rest
    if d.is_empty():
        return np.zeros((0, 2), dtype=np.int64)
    g = d.group_by(cols).agg(pl.col("_r").min().alias("first"), pl.col("_r")).filter(pl.col("_r").list.len() > 1)
    if g.is_empty():
        return np.zeros((0, 2), dtype=np.int64)
    e = g.select("first", "_r").explode("_r").filter(pl.col("_r") != pl.col("first"))
    return np.stack([e["first"].to_numpy(), e["_r"].to_numpy()], axis=1).astype(np.int64)


def load_eval_hashes(sources: list[str]) -> tuple[set[str], list[int]]:
    """sha256 and pHash of every evaluation image (a folder of images, or WebDataset shards)."""
    from curate.algorithms.phash import phash
    from curate.io.images import reduced_decode

    shas: set[str] = set()
    hashes: list[int] = []

    def add(data: bytes, ext: str | None) -> None:
        shas.add(hashlib.sha256(data).hexdigest())
        try:
            rgb, _ = reduced_decode(data, ext, 128, 100_000_000)
            hashes.append(phash(rgb))
        except Exception:  # an undecodable eval image still matches by sha256
            pass

    for src in sources:
        p = Path(src)
        if p.is_dir() and not any(p.glob("*.tar")):
            for f in sorted(p.rglob("*")):
                if f.suffix.lower().lstrip(".") in ("jpg", "jpeg", "png", "webp", "bmp", "gif"):
                    add(f.read_bytes(), f.suffix.lower().lstrip("."))
        else:
            for shard in expand_input(str(p)):
                for s in iter_samples(shard):
                    if s.image():
                        add(s.image(), s.image_ext())
    return shas, hashes
