"""Partitioned dedup combine: exact keys and pHash band keys split by hash over parallel tasks.

Each part reads the partials one shard at a time and keeps only the rows whose key falls in its
partition (for pHash, per lookup table: a row has one band key per table), so its memory is its
share of the pool, about ``tables x 16 / parts`` bytes a sample for pHash; it stores its duplicate edges as pairs of row
ids (``shard index << 32 | row in the shard's partial``). The final combine reads the edge lists,
builds the groups over the rows they touch only, and looks up uids and CLIP scores of those rows:
its memory follows the number of duplicates, not the pool. Groups, kept samples and reasons are the
ones the one-task combine finds (equal-key groups are whole in one part; every pHash pair shares a
key of some table, and that key lies in one part).
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from curate.algorithms.components import component_roots
from curate.algorithms.phash import key_parts, pairs_within_key, search_tables, sorted_unique, unique_pairs
from curate.io.parquet import num_rows, read_frame

ROW_BITS = 32
EDGE_SCHEMA = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64()), pa.field("kind", pa.int8())])
EXACT_COLUMNS = {"image": ["sha256"], "image_caption": ["sha256", "caption_h"], "caption": ["caption_h"],
                 "url": ["url_h"]}


def pool_rows(partials: list) -> int:
    return sum(num_rows(p) for p in partials)


def _key_part(df: pl.DataFrame, column: str, parts: int) -> np.ndarray:
    """Partition of each row's exact key (the first key column decides: equal keys, same part)."""
    if df.schema[column] == pl.String:  # sha256 hex: its first 60 bits are already uniform
        v = df[column].str.slice(0, 15).str.to_integer(base=16, strict=False)
    else:
        v = df[column]
    return ((v % parts + parts) % parts).fill_null(-1).to_numpy()


def _compact(frame: pl.DataFrame) -> pl.DataFrame:
    """A sha256 hex key as four 64-bit integers (the same equality, a quarter of a string's memory)."""
    if "sha256" not in frame.columns:
        return frame
    words = [pl.col("sha256").str.slice(16 * i, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
             .alias(f"sha256_{i}") for i in range(4)]
    return frame.with_columns(*words, pl.col("sha256").str.len_bytes().alias("sha256_len")).drop("sha256")


def _equal_key_edges(frames: list[pl.DataFrame]) -> np.ndarray:
    """(smallest row id, other row id) for every group of rows with equal keys (every column but
    rid, all integers): one sort of the keys, runs of equal keys, no hash table per row."""
    if not frames:
        return np.zeros((0, 2), dtype=np.int64)
    d = pl.concat(frames)
    keys = [d[c].to_numpy() for c in d.columns if c != "rid"]
    rid = d["rid"].to_numpy()
    del d
    order = np.lexsort([rid, *reversed(keys)])  # by the keys, then by row id
    same = np.ones(len(order) - 1, dtype=bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    run_start = np.flatnonzero(np.r_[True, ~same])
    first = np.repeat(run_start, np.diff(np.r_[run_start, len(order)]))  # each row's run start
    member = np.flatnonzero(first != np.arange(len(order)))
    return np.stack([rid[order[first[member]]], rid[order[member]]], axis=1).astype(np.int64)


def part_edges(partials: list, exact: list[str], radius: int | None, part: int, parts: int,
               exact_rank: int, phash_rank: int) -> pa.Table:
    """The duplicate edges whose keys fall in ``part``: equal exact keys, and pHash pairs within
    ``radius`` through the band keys of this part."""
    cols = sorted({c for k in exact for c in EXACT_COLUMNS[k]} | ({"phash"} if radius is not None else set()))
    tables = search_tables(radius, pool_rows(partials)) if radius is not None else []
    exact_rows: dict[str, list[pl.DataFrame]] = {k: [] for k in exact}
    ph_rid: list[list[np.ndarray]] = [[] for _ in tables]  # per table: the rows whose key is in this part
    ph_hash: list[list[np.ndarray]] = [[] for _ in tables]
    for si, path in enumerate(partials):
        df = read_frame(path, columns=cols)
        rid = (np.int64(si) << ROW_BITS) | np.arange(df.height, dtype=np.int64)
        for k in exact:
            kc = EXACT_COLUMNS[k]
            mine = _key_part(df, kc[0], parts) == part
            sel = df.select(kc).with_columns(pl.Series("rid", rid)).filter(pl.Series(mine)).drop_nulls(kc)
            if sel.height:
                exact_rows[k].append(_compact(sel))
        if radius is not None:
            valid = ~df["phash"].is_null().to_numpy()
            h, r = df["phash"].to_numpy()[valid], rid[valid]
            po = key_parts(h, tables, parts)
            for t in range(len(tables)):
                mine = po[:, t] == part
                ph_rid[t].append(r[mine])
                ph_hash[t].append(h[mine])
    edges, kinds = [], []
    for k in exact:
        e = _equal_key_edges(exact_rows[k])
        edges.append(e)
        kinds.append(np.full(len(e), exact_rank, dtype=np.int8))
    if radius is not None:
        found = []
        for t, mask in enumerate(tables):  # one table's share at a time
            rid, h = np.concatenate(ph_rid[t]), np.concatenate(ph_hash[t])
            ph_rid[t] = ph_hash[t] = []
            pr = pairs_within_key(h, mask, radius)
            if len(pr):
                found.append(np.sort(np.stack([rid[pr[:, 0]], rid[pr[:, 1]]], axis=1), axis=1))
        e = unique_pairs(np.concatenate(found)) if found else np.zeros((0, 2), dtype=np.int64)
        edges.append(e)
        kinds.append(np.full(len(e), phash_rank, dtype=np.int8))
    e = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    k = np.concatenate(kinds) if kinds else np.zeros(0, dtype=np.int8)
    return pa.table({"a": e[:, 0], "b": e[:, 1], "kind": k}, schema=EDGE_SCHEMA)


def read_edges(parts: list, phash_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges, kind) over every part; pHash pairs found by several parts counted once."""
    t = read_frame(parts, columns=["a", "b", "kind"])
    a, b, k = t["a"].to_numpy(), t["b"].to_numpy(), t["kind"].to_numpy()
    ph = k == phash_rank
    uniq = unique_pairs(np.stack([a[ph], b[ph]], axis=1)) if ph.any() else np.zeros((0, 2), dtype=np.int64)
    edges = np.concatenate([np.stack([a[~ph], b[~ph]], axis=1), uniq])
    kind = np.concatenate([k[~ph], np.full(len(uniq), phash_rank, dtype=np.int8)])
    return edges, kind


def grouped_rows(partials: list, shards: list[str], edges: np.ndarray, kind: np.ndarray,
                 scored: bool) -> pl.DataFrame:
    """One row per sample touched by an edge: uid, shard, group root, best edge kind, score."""
    nodes = sorted_unique(edges)
    ia, ib = np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1])
    roots = component_roots(len(nodes), np.stack([ia, ib], axis=1))
    best = np.full(len(nodes), 99, dtype=np.int64)
    np.minimum.at(best, ia, kind)
    np.minimum.at(best, ib, kind)
    shard_of = nodes >> ROW_BITS
    bounds = np.searchsorted(shard_of, np.arange(len(partials) + 1))
    frames = []
    for si, path in enumerate(partials):
        lo, hi = bounds[si], bounds[si + 1]
        if lo == hi:
            continue
        df = read_frame(path, columns=["uid", "clip_score"])
        rows = (nodes[lo:hi] & ((1 << ROW_BITS) - 1)).astype(np.int64)
        frames.append(df[rows].with_columns(pl.lit(shards[si], dtype=pl.Enum(shards)).alias("shard"),
                                            pl.Series("root", roots[lo:hi]), pl.Series("kind", best[lo:hi])))
    out = pl.concat(frames)
    if not scored:
        out = out.with_columns(pl.lit(None, dtype=pl.Float32).alias("clip_score"))
    return out


def group_results(rows: pl.DataFrame, kind_names: dict[int, str]) -> pl.DataFrame:
    """Per grouped sample: the group's kept uid (highest score, then smallest uid), dup_of for the
    others, and their reason from the best edge kind that touched them."""
    ranked = rows.with_columns(pl.col("clip_score").fill_null(float("-inf")).alias("_s")).sort(
        ["root", "_s", "uid"], descending=[False, True, False])
    kept = ranked.group_by("root", maintain_order=True).agg(pl.col("uid").first().alias("_kept"))
    out = ranked.join(kept, on="root")
    copy = pl.col("uid") != pl.col("_kept")
    return out.select(
        "uid", "shard", pl.col("_kept").alias("dup_group"), pl.when(copy).then("_kept").alias("dup_of"),
        pl.when(copy).then(pl.col("kind").replace_strict(kind_names, default=None, return_dtype=pl.String))
        .alias("reason")).sort("uid")


def groups_from_parts(partials: list, shards: list[str], part_paths: list, kind_rank: dict[str, int],
                      scored: bool) -> tuple[pl.DataFrame, dict]:
    """The dedup results (uid, shard, dup_group, dup_of, reason) of the grouped samples from the
    parts' edge lists, and the combine's summary (samples, edges per kind, groups, dropped)."""
    edges, kind = read_edges(part_paths, kind_rank["phash"])
    counts = {k: int((kind == rank).sum()) for k, rank in kind_rank.items()}
    out = pl.DataFrame(schema={"uid": pl.String, "shard": pl.Enum(shards), "dup_group": pl.String,
                               "dup_of": pl.String, "reason": pl.String})
    groups = 0
    if len(edges):
        rows = grouped_rows(partials, shards, edges, kind, scored=scored)
        groups = rows["root"].n_unique()
        out = group_results(rows, {r: f"dedup:{k}" for k, r in kind_rank.items()})
    dropped = out.filter(pl.col("reason").is_not_null())
    return out, {"samples": pool_rows(partials), "edges": counts, "groups": groups,
                 "dropped": dict(dropped.group_by("reason").len().iter_rows())}


def group_table(uid: pl.Series, shard: pl.Series, roots: np.ndarray, keep_row: np.ndarray, kind: np.ndarray,
                eval_hit: np.ndarray, kinds: list[str]) -> pl.DataFrame:
    """The one-task combine's results for every row: the uid its group keeps (``dup_group``, rows
    in a group), the one it copies (``dup_of``, the other rows of a group) and the reason:
    ``dedup:<kind>`` of the best edge kind that touched the row (``kind``: its index in ``kinds``),
    ``dedup:eval`` for an evaluation-set copy, which is dropped whether or not it is grouped."""
    n = len(roots)
    in_group = np.bincount(roots, minlength=n)[roots] > 1
    is_copy = in_group & (keep_row != np.arange(n)) & ~eval_hit
    # reasons as codes: an edge kind's rank, the eval label after them, -1 for none
    labels = dict(enumerate([f"dedup:{k}" for k in kinds] + ["dedup:eval"]))
    code = np.where(eval_hit, len(kinds), np.where(is_copy & (kind < len(kinds)), kind, -1))
    # built in polars from numpy masks: no Python object per row
    return pl.DataFrame({"uid": uid, "shard": shard, "_kept": uid.gather(keep_row), "_in": in_group,
                         "_copy": is_copy,
                         "reason": pl.Series(code).replace_strict(labels, default=None, return_dtype=pl.String)}
                        ).select("uid", "shard", pl.when("_in").then("_kept").alias("dup_group"),
                                 pl.when("_copy").then("_kept").alias("dup_of"), "reason")
