"""Text in the image: where it is, how much of the image it covers, what it says, and whether the
caption only repeats it.

Two methods of the DataComp filtering track rest on this. T-MARS (arXiv 2307.03132) masks the text
regions and scores the masked image with CLIP, so a pair whose agreement came only from text
rendered in the image loses it: a ``clip_score`` stage with ``mask_text_from: <this stage's id>``
does the masking, a ``clip_rank`` ranks its scores. CAT (arXiv 2301.02280) drops images whose
caption is spelled out in the image (``max_caption_overlap``) and can cap the text-covered share
(``max_text_area``).

The detector and recogniser are RapidOCR's (their weights ship inside ``rapidocr-onnxruntime``);
images are decoded reduced to ``detect_side`` on their longer side and never enlarged.
"""
from __future__ import annotations

import re
from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from curate.algorithms.text_regions import caption_overlap, covered_share
from curate.core.config import Strict
from curate.core.timeouts import TimeLimiter
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule, measure_images


_ALNUM = re.compile(r"[^\W_]")


@register_stage
class TextMaskStage(RowFilter):
    """Text regions in the image (RapidOCR): boxes, covered share, recognised text, caption overlap (T-MARS, CAT)."""

    name = "text_mask"
    version = "1"
    columns = {
        "text_boxes": "text regions, each [x0, y0, x1, y1] in fractions of the image width and height (the "
                      "axis-aligned hull of the detected quadrilateral), in reading order; with recognise, "
                      "only regions that read as text",
        "text_area": "share of the image covered by the text regions (their union)",
        "ocr_text": "the text of the regions (recognise: true), in reading order, joined by spaces",
        "caption_text_overlap": "share of the caption's words (3+ letters or digits) found in ocr_text "
                                "(spaces and punctuation ignored); null for a caption without words",
    }

    class Params(Strict):
        detect_side: int = Field(640, ge=64, le=4096, description="images are detected at most this many "
                                 "pixels on their longer side (larger ones are reduced, smaller ones kept)")
        recognise: bool = Field(True, description="read each region and keep only those that read as text "
                                "(min_text_confidence, min_text_chars: the detector also fires on shapes, a "
                                "circle reads as 'O'); false: every detected box, no text, about 15 % faster")
        min_text_confidence: float = Field(0.5, ge=0, le=1, description="a region counts as text when the "
                                           "recogniser reads it with at least this confidence...")
        min_text_chars: int = Field(2, ge=1, description="...and at least this many letters or digits in it")
        max_text_area: float | None = Field(None, gt=0, le=1, description="drop images whose text covers "
                                            "more than this share (text_mask:text_area)")
        max_caption_overlap: float | None = Field(None, ge=0, le=1, description="drop pairs whose caption "
                                                  "words are more than this share text read in the image "
                                                  "(text_mask:caption_is_text; CAT)")
        threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per worker")
        max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb cap (header w*h)")
        decode_timeout_s: float | None = Field(30.0, gt=0, description="per-image decode limit; null: none")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @model_validator(mode="after")
        def _overlap_needs_text(self):
            if self.max_caption_overlap is not None and not self.recognise:
                raise ValueError("max_caption_overlap needs recognise: true (the overlap is with recognised text)")
            return self

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._limiter = TimeLimiter(self.params.decode_timeout_s, name=f"{self.stage_id}-decode")

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("text_boxes", pa.list_(pa.list_(pa.float32(), 4))),
                pa.field("text_area", pa.float32()), pa.field("ocr_text", pa.string()),
                pa.field("caption_text_overlap", pa.float32())]

    def needs_pixels(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        from curate.models.versions import installed

        return {"detector": f"rapidocr-onnxruntime {installed('rapidocr-onnxruntime')} (PP-OCRv4 det/rec)",
                "onnxruntime": installed("onnxruntime")}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        try:
            import rapidocr_onnxruntime  # noqa: F401
        except Exception as e:  # missing, or its onnxruntime / OpenCV cannot load
            return [f"{self.stage_id}: the text detector cannot load ({e}); it is the ocr extra: "
                    "pip install 'curate[ocr]' (make install installs it)"]
        return []

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return self.describe()  # another detector version may find other boxes

    def rules(self) -> list[Rule]:
        p = self.params
        out: list[Rule] = []
        if p.max_text_area is not None:
            out.append((pl.col("text_area") > p.max_text_area, "text_mask:text_area"))
        if p.max_caption_overlap is not None:
            out.append((pl.col("caption_text_overlap") > p.max_caption_overlap, "text_mask:caption_is_text"))
        return out

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        from curate.models.text_detector import detect_text, load_text_detector

        p = self.params
        engine = load_text_detector(p.detect_side, p.threads)
        captions = ctx.column("caption")
        empty = {"text_boxes": None, "text_area": None, "ocr_text": None, "caption_text_overlap": None}

        def measure(i: int, rgb) -> dict[str, Any]:
            regions = detect_text(engine, rgb, p.recognise)
            if p.recognise:
                regions = [r for r in regions if r.confidence >= p.min_text_confidence
                           and len(_ALNUM.findall(r.text)) >= p.min_text_chars]
            boxes = [r.box for r in regions]
            vals: dict[str, Any] = {"text_boxes": boxes, "text_area": covered_share(boxes),
                                    "ocr_text": None, "caption_text_overlap": None}
            if p.recognise:
                text = " ".join(r.text for r in regions)
                vals["ocr_text"] = text
                vals["caption_text_overlap"] = caption_overlap(captions[i] or "", text)
            return vals

        return measure_images(ctx, rows, self._limiter, p.detect_side, p.max_pixels, "text_mask", empty, measure)
