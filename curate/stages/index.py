"""Index stage: one streaming pass over a shard records what every sample is made of.

Structural problems (missing image or caption, empty member, bad bytes, unsafe member name) become
``status`` / ``reason_index``; image *content* is judged later by the image stage.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.algorithms.whitespace import ONLY_SPACE
from curate.core.config import Strict
from curate.io.images import image_header
from curate.io.shards import is_metadata_shard, make_uid, sample_uid
from curate.stages.base import MapStage, ShardContext, StageOutput
from curate.stages.registry import register_stage

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
        pass

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
        for s in ctx.samples():
            meta = s.meta()
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
        return StageOutput(cols, reasons)

    def _from_metadata(self, ctx: ShardContext) -> StageOutput:
        """Rows of a metadata shard (DataComp's pool metadata: ``uid``, ``text`` or ``caption``,
        ``url``, ``original_width``/``original_height``, ``sha256``, CLIP scores): no image is read,
        the image columns stay null. A missing or empty caption is noted in ``status`` but drops
        nothing here: metadata rows are judged by the stages a recipe has (DataComp's CLIP-score
        baseline ranks every row, whatever its caption)."""
        import pyarrow.parquet as pq

        from curate.io.storage import open_read

        try:
            with open_read(ctx.shard_path) as f:
                t = pq.read_table(f) if ctx.shard_path.endswith(".parquet") else read_url_list(f, ctx.shard_path)
        except Exception as e:  # unreadable, or not the format its suffix says: the shard is damaged, no row
            ctx.read_result.error = f"not a readable metadata table: {e}"
            t = pa.table({})
        ctx.read_result.n_bytes = t.nbytes
        n = t.num_rows

        def first(*names: str) -> pa.ChunkedArray | None:
            name = next((c for c in names if c in t.column_names), None)
            return t.column(name) if name else None

        def text(*names: str) -> pa.Array:
            c = first(*names)
            return pa.nulls(n, pa.string()) if c is None else pc.cast(c, pa.string()).combine_chunks()

        def score(name: str) -> pa.Array:
            c = first(name)
            return pa.nulls(n, pa.float64()) if c is None else pc.cast(c, pa.float64()).combine_chunks()

        key = text("key") if "key" in t.column_names else pc.cast(pa.array(np.arange(n)), pa.string())
        uid = text("uid")
        if uid.null_count:  # rows without a uid get one from (shard, key), as tar samples do
            missing = np.flatnonzero(uid.is_null().to_numpy(zero_copy_only=False))
            made = dict(zip(missing.tolist(), (make_uid(ctx.shard, k) for k in key.take(missing).to_pylist())))
            uid = pa.array([made.get(i, u) for i, u in enumerate(uid.to_pylist())], pa.string())
        captions = text("text", "caption", "TEXT")
        problem = pc.if_else(pc.is_null(captions), pa.scalar("missing_caption"),
                             pc.if_else(pc.match_substring_regex(captions, ONLY_SPACE),
                                        pa.scalar("empty_caption"), pa.scalar(None, pa.string())))
        cols: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in self.value_fields()}
        cols.update(uid=uid, key=key, shard=pa.array([ctx.shard] * n, pa.string()), url=text("url", "URL"),
                    caption=captions, sha256=text("sha256"),
                    original_width=_sizes(first("original_width"), n),
                    original_height=_sizes(first("original_height"), n),
                    clip_b32_similarity_score=score("clip_b32_similarity_score"),
                    clip_l14_similarity_score=score("clip_l14_similarity_score"),
                    status=pc.fill_null(problem, "ok"), error=problem)
        return StageOutput(cols, [None] * n)
