"""Image stage: size rules from the header (DataComp's on original sizes) and quality measures
on a reduced decode (JPEG DCT-scaled draft or a thumbnail), never a full-resolution decode.

Every measure is a column; thresholds set to null are not applied. Undecodable images, bombs and
oversized files become reasons, never crashes.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io.images import ImageRejected, decode_within, header_info
from curate.algorithms.phash import crop_color_signatures, crop_phashes, phash
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule
from curate.core.timeouts import TimeLimiter

log = logging.getLogger(__name__)


QUALITY = ("blur_var", "entropy", "contrast", "dominant_share", "dark_share", "bright_share")
PIXEL_MEASURES = (*QUALITY, "phash", "phash_crops", "color_sig")  # need a (reduced) decode; sizes, format and mode need only the header
# The measure each threshold reads.
THRESHOLD_MEASURE = {"min_blur_var": "blur_var", "min_entropy": "entropy", "min_contrast": "contrast",
                     "max_dominant_share": "dominant_share", "max_dark_share": "dark_share",
                     "max_bright_share": "bright_share"}


def _median_u8(counts: np.ndarray, n: int) -> int:
    """np.median of n uint8 values from their histogram, truncated to an integer."""
    cum = np.cumsum(counts)
    hi = int(np.searchsorted(cum, n // 2 + 1))  # the value at rank n // 2
    if n % 2:
        return hi
    lo = int(np.searchsorted(cum, n // 2))  # the value at rank n // 2 - 1
    return (lo + hi) // 2


def quality(rgb: np.ndarray, wanted: frozenset[str] | set[str] = frozenset(QUALITY)) -> dict[str, float]:
    """The ``wanted`` measures of QUALITY: blur (Laplacian variance), entropy, contrast, dominant
    colour share, dark/bright shares; each is computed only when asked for."""
    out: dict[str, float] = {}
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if "blur_var" in wanted:
        lap = (4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
        out["blur_var"] = float(lap.var()) if lap.size else 0.0
    if wanted & {"entropy", "dark_share", "bright_share"}:
        g8 = gray.astype(np.uint8)
        hist = np.bincount(g8.ravel(), minlength=256).astype(np.float64)
        p = hist[hist > 0] / g8.size
        out["entropy"] = float(-(p * np.log2(p)).sum())
        out["dark_share"] = float(hist[:16].sum() / g8.size)
        out["bright_share"] = float(hist[241:].sum() / g8.size)
    if "contrast" in wanted:
        out["contrast"] = float(gray.std())
    if "dominant_share" in wanted:
        # Near-uniform: share of pixels within 8 levels (every channel) of the median colour; a
        # histogram mode would split a flat colour that sits on a bin edge. Channel planes are made
        # contiguous once: strided channel views make every bincount and comparison copy.
        planes = np.ascontiguousarray(np.moveaxis(rgb, 2, 0)).reshape(3, -1)
        near = np.ones(planes.shape[1], dtype=bool)
        for ch in planes:
            med = _median_u8(np.bincount(ch, minlength=256), ch.size)
            near &= (ch >= med - 8) & (ch <= med + 8)  # numpy 2 compares uint8 with any int exactly
        out["dominant_share"] = float(near.mean())
    return {k: v for k, v in out.items() if k in wanted}


@register_stage
class ImageStage(RowFilter):
    """Image quality: size, aspect, format, blur, entropy, contrast, near-uniform share, pHash; bombs and decode time limits."""

    name = "image"
    columns = {
        "img_format": "format PIL found when opening the image",
        "img_mode": "PIL mode (RGB, L, RGBA, P, CMYK...)",
        "n_frames": "frames in the image (more than 1: animated)",
        "img_width": "width used by the size rules (original width when the json has it, else the decoded width)",
        "img_height": "height used by the size rules (original height when the json has it, else the decoded height)",
        "aspect": "max(width, height) / min(width, height)",
        "blur_var": "variance of the Laplacian of the reduced grey image (low: blurry)",
        "entropy": "grey-level entropy in bits (low: flat)",
        "contrast": "standard deviation of grey levels",
        "dominant_share": "share of pixels in the most common colour bin (high: blank or near-uniform)",
        "dark_share": "share of near-black pixels",
        "bright_share": "share of near-white pixels",
        "phash": "64-bit perceptual hash (DCT of the 32x32 grey image), as a signed integer",
        "phash_crops": "pHash of each crop window: centre crops keeping 98, 96 and 94 % of each side, then the image "
                       "without 4 % and 8 % at one side, two adjacent sides or two opposite sides (crop-tolerant near "
                       "duplicates)",
        "color_sig": "mean RGB of each cell of a 4x4 grid (48 values) of the image, then of each crop window: confirms "
                     "crop matches in colour",
    }
    version = "5"

    class Params(Strict):
        min_side: int | None = Field(200, ge=1, description="DataComp: min(original w, h) >= 200")
        max_aspect: float | None = Field(3.0, ge=1, description="DataComp: max/min side <= 3")
        use_original_size: bool = Field(True, description="use original_width/height from the json")
        min_bytes: int | None = Field(None, ge=0, description="drop images with fewer bytes")
        max_bytes: int = Field(32 * 1024 * 1024, ge=1, description="larger files are not decoded")
        max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb cap (header w*h)")
        decode_timeout_s: float | None = Field(30.0, gt=0, description="per-image decode limit; null: none")
        thumb: int = Field(128, ge=16, le=1024, description="longest side of the reduced decode")
        min_blur_var: float | None = Field(None, ge=0, description="Laplacian variance on the thumbnail")
        min_entropy: float | None = Field(None, ge=0, le=8, description="drop images whose grey-level entropy (bits) is lower")
        min_contrast: float | None = Field(None, ge=0, description="drop images whose grey-level standard deviation is lower")
        max_dominant_share: float | None = Field(None, gt=0, le=1, description="near-uniform images")
        max_dark_share: float | None = Field(None, gt=0, le=1, description="drop images with more than this share of near-black pixels")
        max_bright_share: float | None = Field(None, gt=0, le=1, description="drop images with more than this share of near-white pixels")
        drop_animated: bool = Field(False, description="drop images with more than one frame")
        measures: Literal["needed", "all"] | list[Literal[PIXEL_MEASURES]] = Field(  # type: ignore[valid-type]
            "needed", description="pixel measures to compute: needed (those the thresholds and later "
            "stages read; none: no pixel is decoded), all, or a list; the pipeline stores the resolved list")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._limiter = TimeLimiter(self.params.decode_timeout_s, name=f"{self.stage_id}-decode")
        self._empty = dict.fromkeys(f.name for f in self.value_fields())  # copied per image
        self.pixel_measures = self._pixel_measures()

    QUALITY = QUALITY

    def with_later_reads(self, columns: set[str]) -> "ImageStage":
        """The stage with ``measures`` resolved to an explicit list: the thresholds' measures, what
        later stages read (dedup's phash), and any listed; ``all`` lists every measure."""
        p = self.params
        if p.measures == "all":
            wanted = set(PIXEL_MEASURES)
        else:
            wanted = {m for k, m in THRESHOLD_MEASURE.items() if getattr(p, k) is not None}
            wanted |= columns & set(PIXEL_MEASURES)
            wanted |= set(p.measures) if isinstance(p.measures, list) else set()
        resolved = [m for m in PIXEL_MEASURES if m in wanted]
        return type(self)(p.model_copy(update={"measures": resolved}), self.stage_id)

    def needs_pixels(self) -> bool:
        return bool(self.pixel_measures) or self.params.drop_animated

    def index_columns(self) -> set[str]:
        return {"original_width", "original_height"}

    def computed_columns(self, metadata_pool: bool) -> set[str]:
        sizes = {"img_width", "img_height", "aspect"} | (set() if metadata_pool else {"img_format"})
        if not self.needs_pixels():
            return sizes
        return sizes | {"img_format", "img_mode", "n_frames", *self.pixel_measures}

    def _pixel_measures(self) -> frozenset[str]:
        """The pixel measures this stage computes (read once per image on the hot path: kept as
        ``self.pixel_measures``)."""
        m = self.params.measures
        return frozenset(PIXEL_MEASURES if m == "all" else
                         [x for k, x in THRESHOLD_MEASURE.items() if getattr(self.params, k) is not None]
                         if m == "needed" else m)

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("img_format", pa.string()), pa.field("img_mode", pa.string()),
                pa.field("n_frames", pa.int32()), pa.field("img_width", pa.int32()),
                pa.field("img_height", pa.int32()), pa.field("aspect", pa.float32()),
                *[pa.field(q, pa.float32()) for q in self.QUALITY], pa.field("phash", pa.int64()),
                pa.field("phash_crops", pa.list_(pa.int64())), pa.field("color_sig", pa.list_(pa.uint8()))]

    def measure_image(self, data: bytes | None, ext: str | None, orig: tuple[int | None, int | None]
                      ) -> tuple[dict[str, Any], str | None]:
        """Values of one image, and the reason when it cannot be measured (missing, too large,
        undecodable, a bomb, a decode past its time limit)."""
        p = self.params
        vals: dict[str, Any] = self._empty.copy()
        if not data:
            return vals, "image:missing"
        if len(data) > p.max_bytes:
            return vals, "image:too_large_bytes"
        wanted = self.pixel_measures
        if wanted:
            rgb, decoded, reason = decode_within(self._limiter, data, ext, p.thumb, p.max_pixels)
            if decoded is None:
                return vals, reason
            info = decoded
        else:
            rgb = None
            try:
                info = header_info(data, ext, p.max_pixels)
            except ImageRejected as r:
                return vals, str(r)
        w, h = info["w"], info["h"]
        if p.use_original_size and orig[0] and orig[1]:
            w, h = orig
        vals.update(img_format=info["format"], img_mode=info["mode"], n_frames=info["n_frames"],
                    img_width=w, img_height=h, aspect=max(w, h) / max(1, min(w, h)))
        if rgb is not None:
            vals.update(quality(rgb, wanted))
            # hashes from the same reduced decode, for near-duplicate search
            if "phash" in wanted:
                vals["phash"] = phash(rgb)
            if "phash_crops" in wanted:
                vals["phash_crops"] = crop_phashes(rgb)
            if "color_sig" in wanted:
                vals["color_sig"] = crop_color_signatures(rgb)
        return vals, None

    def measure_one(self, data: bytes | None, ext: str | None, orig: tuple[int | None, int | None]
                    ) -> tuple[dict[str, Any], str | None]:
        """Values and the first failing rule for one image."""
        vals, failed = self.measure_image(data, ext, orig)
        m = Measured({k: [v] for k, v in vals.items()}, [failed], {"n_bytes": [len(data or b"")]})
        return vals, self.reasons(m)[0]

    def rules(self) -> list[Rule]:
        """The size, format and quality rules, in a fixed order."""
        p = self.params
        col = pl.col
        checks: list[tuple[Any, pl.Expr, str]] = [
            (p.min_bytes, col("n_bytes") < (p.min_bytes or 0), "image:too_small_bytes"),
            (p.min_side, pl.min_horizontal("img_width", "img_height") < (p.min_side or 0), "image:min_side"),
            (p.max_aspect, col("aspect") > (p.max_aspect or 0), "image:aspect"),
            (p.drop_animated or None, col("n_frames") > 1, "image:animated"),
            (p.max_dominant_share, col("dominant_share") > (p.max_dominant_share or 0), "image:uniform"),
            (p.min_entropy, col("entropy") < (p.min_entropy or 0), "image:low_entropy"),
            (p.min_contrast, col("contrast") < (p.min_contrast or 0), "image:low_contrast"),
            (p.min_blur_var, col("blur_var") < (p.min_blur_var or 0), "image:blurry"),
            (p.max_dark_share, col("dark_share") > (p.max_dark_share or 0), "image:dark"),
            (p.max_bright_share, col("bright_share") > (p.max_bright_share or 0), "image:bright"),
        ]
        return [(bad, why) for threshold, bad, why in checks if threshold is not None]

    def _from_index(self, ctx: ShardContext, rows: list[int]) -> Measured:
        """Size rules from what the index stage read from each header (and json): no tar read.
        A row of a metadata pool (no image yet) is judged on its original sizes alone."""
        p = self.params
        t = ctx.index(["image_format", "image_bytes", "width", "height", "original_width", "original_height"])
        d = pl.from_arrow(t.take(pa.array(rows, pa.int64())) if len(rows) != t.num_rows else t)
        fmt, nbytes = pl.col("image_format"), pl.col("image_bytes")
        meta = nbytes.is_null() & fmt.is_null()
        has_size = (pl.col("width").fill_null(0) != 0) & (pl.col("height").fill_null(0) != 0)
        has_original = (pl.col("original_width").fill_null(0) != 0) & (pl.col("original_height").fill_null(0) != 0)
        w = pl.when(meta).then(0).otherwise(pl.col("width")).cast(pl.Int64)
        h = pl.when(meta).then(0).otherwise(pl.col("height")).cast(pl.Int64)
        why = (pl.when(meta).then(pl.when(has_original).then(None).otherwise(pl.lit("image:no_size")))
               .when(nbytes.fill_null(0) == 0).then(pl.lit("image:missing"))
               .when(nbytes > p.max_bytes).then(pl.lit("image:too_large_bytes"))
               .when(fmt.is_null() | ~has_size).then(pl.lit("image:undecodable"))
               .when(w * h > p.max_pixels).then(pl.lit("image:too_many_pixels"))
               .otherwise(None))
        original = (pl.lit(p.use_original_size) | (w == 0)) & has_original
        d = d.with_columns(why.alias("why"),
                           pl.when(original).then(pl.col("original_width")).otherwise(w).cast(pl.Int64).alias("w"),
                           pl.when(original).then(pl.col("original_height")).otherwise(h).cast(pl.Int64).alias("h"))
        ok = pl.col("why").is_null()
        d = d.select(
            "why", "image_bytes",
            pl.when(ok & (fmt.fill_null("") != "")).then(fmt.str.to_lowercase()).alias("img_format"),
            pl.when(ok).then(pl.col("w")).alias("img_width"),
            pl.when(ok).then(pl.col("h")).alias("img_height"),
            pl.when(ok).then(pl.max_horizontal("w", "h") / pl.max_horizontal(pl.min_horizontal("w", "h"), 1))
            .alias("aspect"))
        values: dict[str, list] = {k: [None] * len(rows) for k in self._empty}
        values.update({k: d[k].to_list() for k in ("img_format", "img_width", "img_height", "aspect")})
        return Measured(values, d["why"].to_list(), {"n_bytes": d["image_bytes"].to_list()})

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        if not self.pixel_measures and not self.params.drop_animated:
            return self._from_index(ctx, rows)
        ow, oh = ctx.column("original_width"), ctx.column("original_height")
        got: dict[int, tuple[dict[str, Any], str | None, int]] = {}
        for i, s in ctx.samples_at(rows):
            data = s.image()
            vals, why = self.measure_image(data, s.image_ext(), (ow[i], oh[i]))
            if self.pixel_measures and vals["img_format"] is not None:
                ctx.count("images_decoded")
            got[i] = (vals, why, len(data or b""))
        # rows the tar no longer yields (a changed shard) are judged, not lost
        missing = (self._empty.copy(), "image:missing", 0)
        measured = [got.get(i, missing) for i in rows]
        values = {f.name: [m[0][f.name] for m in measured] for f in self.value_fields()}
        return Measured(values, [m[1] for m in measured], {"n_bytes": [m[2] for m in measured]})
