"""Index stage: one streaming pass over a shard records what every sample is made of.

Structural problems (missing image or caption, empty member, bad bytes, unsafe member name) become
``status`` / ``reason_index``; image *content* is judged later by the image stage.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pathlib import Path

from pydantic import Field, field_validator

from curate.algorithms.whitespace import ONLY_SPACE
from curate.core.config import ConfigError, Strict
from curate.io.images import image_header
from curate.io.shards import is_metadata_shard, make_uid, sample_uid
from curate.contract.base import MapStage, ShardContext, StageOutput
from curate.contract.registry import register_stage

log = logging.getLogger(__name__)


def read_url_list(f, path: str) -> pa.Table:
    """A CSV or TSV URL list (img2dataset's input): text columns stay strings (a hex uid of digits
    only must not become a number); a TSV has no quoting, as img2dataset writes it."""
    from pyarrow import csv

    tsv = path.endswith(".tsv")
    text_cols = ["uid", "url", "URL", "text", "caption", "TEXT", "key", "sha256"]
    return csv.read_csv(f, parse_options=csv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"'),
                        convert_options=csv.ConvertOptions(column_types={c: pa.string() for c in text_cols}))


def _sizes(c: pa.ChunkedArray | None, n: int) -> pa.Array:
    """Original sizes as ``_int_or_none`` takes them, for a whole column: integers and floats in
    [0, 2**31) (floats truncated), anything else (booleans, strings, NaN) null."""
    if c is None or not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)):
        return pa.nulls(n, pa.int32())
    if pa.types.is_floating(c.type):
        c = pc.cast(c, pa.float64())
        ok = pc.and_(pc.greater_equal(c, 0.0), pc.less(c, float(2**31)))  # NaN: false
        kept = pc.floor(pc.if_else(ok, c, pa.scalar(None, c.type)))
    else:  # each bound in the column's own type (a uint64 does not compare with an int64)
        ok = pc.greater_equal(c, pa.scalar(0, c.type))
        if c.type.bit_width > 32 or c.type == pa.uint32():
            ok = pc.and_(ok, pc.less(c, pa.scalar(2**31, c.type)))
        kept = pc.if_else(ok, c, pa.scalar(None, c.type))
    return pc.cast(kept, pa.int32()).combine_chunks()


# curate's name of each pool column -> the names it is looked up under, first found wins (DataComp's
# metadata, img2dataset's URL lists and json). A recipe or run config maps others: columns: {caption: alt_text}.
SOURCE_NAMES: dict[str, tuple[str, ...]] = {
    "uid": ("uid",), "key": ("key",), "caption": ("text", "caption", "TEXT"), "url": ("url", "URL"),
    "sha256": ("sha256",), "original_width": ("original_width",), "original_height": ("original_height",),
    "clip_b32_similarity_score": ("clip_b32_similarity_score",),
    "clip_l14_similarity_score": ("clip_l14_similarity_score",),
}
MAPPABLE = tuple(SOURCE_NAMES)
# Below this many rows with one structural problem a shard is not judged by its share.
MIN_ROWS_JUDGED = 10


def source_names(name: str, mapping: dict[str, str]) -> tuple[str, ...]:
    return (mapping[name],) if name in mapping else SOURCE_NAMES[name]


def metadata_columns_problem(found: list[str], require: list[str], mapping: dict[str, str], shard: str) -> str | None:
    """Why a metadata table with columns ``found`` cannot feed a pipeline that needs ``require``
    (curate's names), or None. Names what was looked for, what is there and how to map it."""
    missing = [c for c in require if not any(n in found for n in source_names(c, mapping))]
    unmapped = [f"{k}: {v}" for k, v in mapping.items() if v not in found]
    if not missing and not unmapped:
        return None
    looked = "; ".join(f"{c} as {' or '.join(source_names(c, mapping))}" for c in missing)
    parts = [f"metadata shard {shard} lacks column(s) the pipeline needs: {looked}"] if missing else []
    if unmapped:
        parts.append(f"the columns mapping names column(s) it does not have ({', '.join(unmapped)})")
    example = f"{missing[0]}: <your column>" if missing else unmapped[0]
    return ("; ".join(parts) + f". Its columns: {', '.join(found) or 'none'}. Map yours with `columns:` in the run "
            f"config or the recipe's index stage, e.g. columns: {{{example}}}")


def structural_problem(statuses: list[str], shard: str, max_share: float, judged: set[str] | None = None) -> str | None:
    """Why a shard whose rows mostly share one structural problem (a pool read with the wrong layout
    or column names) must not pass as data, or None. ``judged``: the statuses that count (all)."""
    n = len(statuses)
    counts = Counter(s for s in statuses if s != "ok" and (judged is None or s in judged))
    if not n or not counts:
        return None
    status, k = counts.most_common(1)[0]
    if k < MIN_ROWS_JUDGED or k / n <= max_share:
        return None
    return (f"shard {shard}: {k} of {n} rows ({k / n:.0%}) are {status}: is the pool in the layout curate reads "
            f"(captions in .txt or a caption column, images as .jpg/.png/.webp...)? Map other column names with "
            f"`columns:`; to run on it anyway, set the index stage's max_structural_share above {k / n:.2f} "
            "(1.0: never judged)")


def read_metadata_columns(path: str) -> list[str]:
    """The column names of a metadata shard, from its Parquet footer or its CSV/TSV header line."""
    import pyarrow.parquet as pq

    from curate.io.storage import open_read

    with open_read(path) as f:
        if path.endswith(".parquet"):
            return pq.read_schema(f).names
        return _header(f, path)


def _header(f, path: str) -> list[str]:
    line = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    return [c.strip('"') for c in line.split("\t" if path.endswith(".tsv") else ",")]


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and 0 <= v < 2**31:
        return int(v)
    return None


def decode_caption(raw: bytes | None) -> tuple[str | None, str | None]:
    """(caption, problem). Non-UTF-8 bytes are replaced for display and flagged."""
    if raw is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), "caption_not_utf8"
    if not text.strip():
        return text, "empty_caption"
    return text, None


@register_stage
class IndexStage(MapStage):
    """One row per sample of the shard: uid, key, caption, image format and sizes, structural status."""

    name = "index"
    columns = {
        "key": "the sample's key in its tar (member names without extension)",
        "shard": "input shard name (file name without extension)",
        "url": "source URL from the sample's json, when present",
        "caption": "the caption (.txt member), decoded as UTF-8",
        "image_format": "image format from the file header (JPEG, PNG, WEBP...)",
        "image_ext": "extension of the image member in the tar",
        "image_bytes": "size of the image member in bytes",
        "sha256": "SHA-256 of the image bytes (hex)",
        "width": "image width in pixels, from the file header",
        "height": "image height in pixels, from the file header",
        "original_width": "width before img2dataset resized it (json original_width), when present",
        "original_height": "height before img2dataset resized it (json original_height), when present",
        "clip_b32_similarity_score": "DataComp metadata: the pool's ViT-B/32 CLIP score (metadata pools only)",
        "clip_l14_similarity_score": "DataComp metadata: the pool's ViT-L/14 CLIP score (metadata pools only)",
        "status": "ok, or the structural problem of the sample (missing or empty member, bad caption, unsafe name, truncated tar)",
        "error": "detail of a structural problem (null when status is ok)",
    }
    version = "2"

    class Params(Strict):
        columns: dict[str, str] = Field(default_factory=dict, description="the pool's own name (metadata column or "
                                        f"json key) for curate's names ({', '.join(MAPPABLE)}), e.g. {{caption: alt_text}}")
        max_structural_share: float = Field(0.5, gt=0, le=1, description="fail a shard when more than this share "
                                            "of its rows has one structural problem (missing caption or image...): "
                                            "a pool read with the wrong layout or names; 1: never")
        require: list[str] | None = Field(None, description="index columns the pipeline's decisions rest on "
                                          "(resolved from the later stages; a metadata pool must have them)")

        @field_validator("columns")
        @classmethod
        def _known_names(cls, v: dict[str, str]) -> dict[str, str]:
            bad = sorted(set(v) - set(MAPPABLE))
            if bad:
                raise ValueError(f"cannot map {bad} (allowed: {', '.join(MAPPABLE)})")
            return v

    def with_later_reads(self, columns: set[str]) -> "IndexStage":
        """The stage with ``require`` resolved: the index columns the later stages rest on."""
        if self.params.require is not None:
            return self
        return type(self)(self.params.model_copy(update={"require": sorted(columns & set(MAPPABLE))}), self.stage_id)

    def fingerprint_params(self) -> dict[str, Any]:
        """Without ``require`` and ``max_structural_share``: they fail a shard or let it pass, and a
        shard that passes is written alike, so recipes that need other columns share one index."""
        return self.params.model_dump(mode="json", exclude={"require", "max_structural_share"})

    def computed_columns(self, metadata_pool: bool) -> set[str]:
        pixels = {"image_format", "image_ext", "image_bytes", "width", "height"}
        scores = {"clip_b32_similarity_score", "clip_l14_similarity_score"}
        return {f.name for f in self.value_fields()} - (pixels if metadata_pool else scores)

    def preflight_pool(self, shard_paths: list[str]) -> list[str]:
        """The first metadata shard's columns against what the pipeline needs (each shard is
        checked again when it is indexed); an unreadable one is left to the run to report."""
        meta = [p for p in shard_paths if is_metadata_shard(p)][:1]
        for path in meta:
            try:
                found = read_metadata_columns(path)
            except Exception:  # damaged: reported as a bad shard by the run, with its readable rest
                continue
            problem = metadata_columns_problem(found, self.params.require or [], self.params.columns,
                                               Path(path).name)
            if problem:
                return [problem]
        return []

    def value_fields(self) -> list[pa.Field]:
        return [
            pa.field("key", pa.string()),
            pa.field("shard", pa.string()),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("image_format", pa.string()),
            pa.field("image_ext", pa.string()),
            pa.field("image_bytes", pa.int64()),
            pa.field("sha256", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
            pa.field("clip_b32_similarity_score", pa.float64()),
            pa.field("clip_l14_similarity_score", pa.float64()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
        ]

    def process(self, ctx: ShardContext) -> StageOutput:
        if is_metadata_shard(ctx.shard_path):
            return self._from_metadata(ctx)
        cols: dict[str, list] = {f.name: [] for f in self.value_fields()}
        cols["uid"] = []
        reasons: list[str | None] = []
        seen: set[str] = set()
        names = {c: source_names(c, self.params.columns) for c in ("uid", "caption", "url", "original_width",
                                                                  "original_height")}

        def field(meta: dict[str, Any], name: str) -> Any:
            return next((meta[k] for k in names[name] if k in meta), None)

        for s in ctx.samples():
            meta = s.meta()
            if self.params.columns:  # the json's own names, as curate reads them
                meta = meta | {c: field(meta, c) for c in names}
            uid = sample_uid(s, meta, ctx.shard)
            problems = list(s.problems)
            if uid in seen:
                # Two members groups with one uid (e.g. a repeated key): keep rows unique by uid.
                problems.append("duplicate_uid")
                uid = sample_uid(s, {}, ctx.shard + "#" + str(len(cols["uid"])))
            seen.add(uid)
            img = s.image()
            fmt = w = h = None
            if img is None:
                problems.append("missing_image")
            elif len(img) == 0:
                problems.append("empty_image")
            else:
                fmt, w, h = image_header(img, s.image_ext())
            caption, cap_problem = decode_caption(s.caption_bytes())
            if caption is None and isinstance(meta.get("caption"), str):
                caption, cap_problem = meta["caption"], (None if meta["caption"].strip() else "empty_caption")
            if cap_problem:
                problems.append(cap_problem)
            url = meta.get("url")
            cols["uid"].append(uid)
            cols["key"].append(s.key)
            cols["shard"].append(ctx.shard)
            cols["url"].append(url if isinstance(url, str) else None)
            cols["caption"].append(caption)
            cols["image_format"].append(fmt)
            cols["image_ext"].append(s.image_ext())
            cols["image_bytes"].append(len(img) if img is not None else None)
            cols["sha256"].append(hashlib.sha256(img).hexdigest() if img else None)
            cols["width"].append(w)
            cols["height"].append(h)
            cols["original_width"].append(_int_or_none(meta.get("original_width")))
            cols["original_height"].append(_int_or_none(meta.get("original_height")))
            cols["clip_b32_similarity_score"].append(None)
            cols["clip_l14_similarity_score"].append(None)
            # Structural problems stop the sample; json/size notes alone do not.
            blocking = [p for p in problems if not p.startswith(("json:", "member:duplicate"))]
            cols["status"].append(blocking[0] if blocking else "ok")
            cols["error"].append(";".join(problems) if problems else None)
            reasons.append(f"index:{blocking[0]}" if blocking else None)
        problem = structural_problem(cols["status"], ctx.shard, self.params.max_structural_share)
        if problem:
            raise ConfigError(problem)
        return StageOutput(cols, reasons)

    def _from_metadata(self, ctx: ShardContext) -> StageOutput:
        """Rows of a metadata shard (DataComp's pool metadata: ``uid``, ``text`` or ``caption``,
        ``url``, ``original_width``/``original_height``, ``sha256``, CLIP scores): no image is read,
        the image columns stay null. A missing or empty caption is noted in ``status`` but drops
        nothing here: metadata rows are judged by the stages a recipe has (DataComp's CLIP-score
        baseline ranks every row, whatever its caption)."""
        from curate.io.parquet import parquet_file
        from curate.io.storage import open_read

        try:
            with open_read(ctx.shard_path) as f:
                t = parquet_file(f) if ctx.shard_path.endswith(".parquet") else read_url_list(f, ctx.shard_path)
        except Exception as e:  # unreadable, or not the format its suffix says: the shard is damaged, no row
            ctx.read_result.error = f"not a readable metadata table: {e}"
            t = pa.table({})
        ctx.read_result.n_bytes = t.nbytes
        n = t.num_rows
        mapping = self.params.columns
        if not ctx.read_result.error:
            problem = metadata_columns_problem(t.column_names, self.params.require or [], mapping, Path(ctx.shard_path).name)
            if problem:
                raise ConfigError(problem)

        def first(name: str) -> pa.ChunkedArray | None:
            found = next((c for c in source_names(name, mapping) if c in t.column_names), None)
            return t.column(found) if found else None

        def text(name: str) -> pa.Array:
            c = first(name)
            return pa.nulls(n, pa.string()) if c is None else pc.cast(c, pa.string()).combine_chunks()

        def score(name: str) -> pa.Array:
            c = first(name)
            return pa.nulls(n, pa.float64()) if c is None else pc.cast(c, pa.float64()).combine_chunks()

        key = text("key") if first("key") is not None else pc.cast(pa.array(np.arange(n)), pa.string())
        uid = text("uid")
        if uid.null_count:  # rows without a uid get one from (shard, key), as tar samples do
            missing = np.flatnonzero(uid.is_null().to_numpy(zero_copy_only=False))
            made = dict(zip(missing.tolist(), (make_uid(ctx.shard, k) for k in key.take(missing).to_pylist())))
            uid = pa.array([made.get(i, u) for i, u in enumerate(uid.to_pylist())], pa.string())
        captions = text("caption")
        problem = pc.if_else(pc.is_null(captions), pa.scalar("missing_caption"),
                             pc.if_else(pc.match_substring_regex(captions, ONLY_SPACE),
                                        pa.scalar("empty_caption"), pa.scalar(None, pa.string())))
        cols: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in self.value_fields()}
        cols.update(uid=uid, key=key, shard=pa.array([ctx.shard] * n, pa.string()), url=text("url"),
                    caption=captions, sha256=text("sha256"),
                    original_width=_sizes(first("original_width"), n),
                    original_height=_sizes(first("original_height"), n),
                    clip_b32_similarity_score=score("clip_b32_similarity_score"),
                    clip_l14_similarity_score=score("clip_l14_similarity_score"),
                    status=pc.fill_null(problem, "ok"), error=problem)
        if "caption" in (self.params.require or []):  # a caption column that is mostly empty
            why = structural_problem(cols["status"].to_pylist(), ctx.shard, self.params.max_structural_share)
            if why:
                raise ConfigError(why)
        return StageOutput(cols, [None] * n)
