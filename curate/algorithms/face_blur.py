"""Faces blurred in an image's bytes, the way DataComp's pool was blurred: img2dataset's
``BoundingBoxBlurrer`` (each box grown by 10 % of its longer side, a Gaussian blur with sigma 0.1 x
the largest face's longer side, blended in with a blurred mask; the scheme of the ImageNet face
obfuscation study). An image without a box keeps its bytes; one with boxes is re-encoded in its own
format (JPEG with the source's quantisation tables and subsampling, so the rest of the image barely
moves; WebP at quality 95; PNG lossless; other formats become PNG), with the source's EXIF.
"""
from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np

from curate.io.images import open_image, to_rgb

BLUR = ("img2dataset BoundingBoxBlurrer: boxes grown by 10 % of their longer side, Gaussian blur with sigma "
        "0.1 x the largest face's longer side (as DataComp's pool); JPEG re-encoded with its own tables")
_SAVE = {"JPEG": ("jpg", {"quality": 95}), "WEBP": ("webp", {"quality": 95}), "PNG": ("png", {})}


@lru_cache(maxsize=1)
def _blurrer():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for news on import
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from img2dataset.blurrer import BoundingBoxBlurrer

        return BoundingBoxBlurrer()


def blur_faces(data: bytes, ext: str, boxes: list[list[float]] | None) -> tuple[bytes, str]:
    """(bytes, extension) of the image with every box (fractions ``[x0, y0, x1, y1]``) blurred;
    the input unchanged when there is no box."""
    if not boxes:
        return data, ext
    im = open_image(data, ext)
    fmt, exif = im.format, im.info.get("exif")
    keep: dict = {}
    if fmt == "JPEG":  # the source's own tables and subsampling: the rest of the image barely moves
        from PIL import JpegImagePlugin

        sampling = JpegImagePlugin.get_sampling(im)
        keep = {"qtables": im.quantization, **({"subsampling": sampling} if sampling >= 0 else {})}
    rgb = np.asarray(to_rgb(im))
    import warnings

    with warnings.catch_warnings():  # albumentations warns about its own deprecated arguments
        warnings.simplefilter("ignore")
        out = _blurrer()(rgb, [list(map(float, b)) for b in boxes])
    from PIL import Image

    new_ext, options = _SAVE.get(fmt or "", ("png", {}))
    if exif and new_ext != "png":
        options = options | {"exif": exif}
    if new_ext == "jpg" and keep.get("qtables"):
        options = {k: v for k, v in options.items() if k != "quality"} | keep
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format={"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[new_ext], **options)
    return buf.getvalue(), ext if new_ext == "jpg" and ext in ("jpg", "jpeg") else new_ext
