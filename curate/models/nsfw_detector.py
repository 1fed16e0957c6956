"""Exposed-body detection in images: NudeNet's detector (``nudenet``), a YOLO model whose ONNX
weights (320n.onnx) ship inside its wheel, run by onnxruntime on the CPU. Nothing is downloaded.

NudeNet's own pre- and post-processing are used (square padding, 320 px input, its score floor 0.2
and non-maximum suppression); only the onnxruntime session is made here, with a fixed thread count,
so scores do not depend on the machine's cores and a Dask worker's cores stay its own.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# What NudeNet names "exposed" explicit content; the other classes (faces, covered parts, feet,
# armpits, belly) describe ordinary photos.
EXPLICIT = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
            "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")


def labels() -> list[str]:
    """Every class the detector knows."""
    import nudenet.nudenet as nn

    return list(getattr(nn, "__labels"))


@lru_cache(maxsize=2)
def load_nsfw_detector(threads: int = 1):
    import os

    import nudenet
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    det = nudenet.NudeDetector()
    det.onnx_session = ort.InferenceSession(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"),
                                            options, providers=["CPUExecutionProvider"])
    return det


def detect_nsfw(detector, rgb: np.ndarray) -> list[tuple[str, float]]:
    """(class, score) of every region found in an RGB uint8 image, highest score first."""
    # NudeNet converts its input with RGBA->BGR, so it gets the RGBA it expects
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    found = detector.detect(np.ascontiguousarray(rgba))
    return sorted(((d["class"], round(float(d["score"]), 5)) for d in found), key=lambda x: (-x[1], x[0]))
