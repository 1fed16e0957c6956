"""Text detection and recognition in images: RapidOCR (``rapidocr-onnxruntime``), whose PP-OCRv4
detector and recogniser ship inside its wheel as ONNX files, run by onnxruntime on the CPU.
Nothing is downloaded.

One engine per worker process and setting. Threads are fixed (one by default) so results do not
depend on the machine's core count, and a Dask worker's cores stay its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from curate.algorithms.text_regions import quad_to_box


@dataclass(frozen=True)
class TextRegion:
    box: list[float]  # [x0, y0, x1, y1], fractions of the image
    text: str  # what the recogniser read ("" when recognition is off)
    confidence: float  # the recogniser's confidence (0.0 when recognition is off)


@lru_cache(maxsize=2)
def load_text_detector(side: int, threads: int = 1):
    """The RapidOCR engine: images whose longer side exceeds ``side`` are detected at that size
    (never enlarged); no orientation classifier (text rotated 180 degrees is rare on the web)."""
    from rapidocr_onnxruntime import RapidOCR

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    return RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, use_cls=False,
                    det_limit_side_len=side, det_limit_type="max")


def detect_text(engine, rgb: np.ndarray, recognise: bool = True) -> list[TextRegion]:
    """The text regions of an RGB uint8 image in reading order (top to bottom, left to right)."""
    h, w = rgb.shape[:2]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    # text_score 0: every detected region is returned, whatever the recogniser thinks of it
    found, _ = engine(bgr, use_det=True, use_cls=False, use_rec=recognise, text_score=0.0)
    regions = []
    for r in found or []:
        quad = r[0] if recognise else r
        text, conf = (str(r[1]), float(r[2])) if recognise else ("", 0.0)
        regions.append(TextRegion([round(v, 5) for v in quad_to_box(quad, w, h)], text, conf))
    return regions
