"""Explicit content in the image: NudeNet's detector (weights inside the ``nudenet`` wheel), as
NeMo Curator and LAION filter it. The score of an image is the highest score among the chosen
classes (by default the exposed explicit ones); ``max_score`` drops the image above it.

For a classifier on CLIP embeddings instead (LAION's NSFW head), use ``embedding_head`` with the
user's checkpoint. Images are decoded reduced to ``decode_side`` on their longer side; the detector
itself looks at 320 px.
"""
from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from curate.core.config import Strict
from curate.core.timeouts import TimeLimiter
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule, measure_images


@register_stage
class NsfwStage(RowFilter):
    """Explicit content per image (NudeNet's detector): a score and the classes found."""

    name = "nsfw"
    version = "1"
    columns = {
        "nsfw_score": "highest detector score among `classes` (0 when none was found)",
        "nsfw_labels": "the `classes` found, highest score first (each class once)",
    }

    class Params(Strict):
        classes: list[str] = Field(default_factory=lambda: [
            "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
            "ANUS_EXPOSED"], description="NudeNet classes that count (its faces, covered parts, feet... describe "
                                         "ordinary photos)")
        max_score: float | None = Field(0.6, gt=0, le=1, description="drop images whose nsfw_score is at least "
                                        "this (nsfw:explicit); null: score only")
        decode_side: int = Field(640, ge=64, le=4096, description="images are decoded at most this many pixels "
                                 "on their longer side before detection")
        threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per worker")
        max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb cap (header w*h)")
        decode_timeout_s: float | None = Field(30.0, gt=0, description="per-image decode limit; null: none")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @field_validator("classes")
        @classmethod
        def _known(cls, v: list[str]) -> list[str]:
            from curate.models.nsfw_detector import labels

            known = labels()
            unknown = [c for c in v if c not in known]
            if unknown or not v:
                raise ValueError(f"unknown class(es) {unknown} (NudeNet's: {', '.join(known)})" if unknown
                                 else "give at least one class")
            return v

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._limiter = TimeLimiter(self.params.decode_timeout_s, name=f"{self.stage_id}-decode")

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("nsfw_score", pa.float32()), pa.field("nsfw_labels", pa.list_(pa.string()))]

    def needs_pixels(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        from curate.models.versions import installed

        return {"detector": f"nudenet {installed('nudenet')} (320n.onnx)", "onnxruntime": installed("onnxruntime")}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        try:
            from curate.models.nsfw_detector import load_nsfw_detector

            load_nsfw_detector(self.params.threads)
        except Exception as e:  # missing package, or its onnxruntime / OpenCV cannot load
            return [f"{self.stage_id}: the NSFW detector cannot load ({e}); it is the nsfw extra: "
                    "pip install 'curate[nsfw]' (make install installs it)"]
        return []

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return self.describe()

    def rules(self) -> list[Rule]:
        if self.params.max_score is None:
            return []
        return [(pl.col("nsfw_score") >= self.params.max_score, "nsfw:explicit")]

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        from curate.models.nsfw_detector import detect_nsfw, load_nsfw_detector

        p = self.params
        detector = load_nsfw_detector(p.threads)
        wanted = set(p.classes)
        def measure(i: int, rgb) -> dict[str, Any]:
            found = [(c, sc) for c, sc in detect_nsfw(detector, rgb) if c in wanted]
            return {"nsfw_score": found[0][1] if found else 0.0,
                    "nsfw_labels": list(dict.fromkeys(c for c, _ in found))}

        return measure_images(ctx, rows, self._limiter, p.decode_side, p.max_pixels, "nsfw",
                              {"nsfw_score": None, "nsfw_labels": None}, measure)
