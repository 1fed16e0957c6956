"""Image bytes to pixels, shared by every stage that looks at images (index, image, clip_score,
dedup's evaluation sets): format hints, the decompression-bomb cap read from the header, reduced
JPEG decoding (DCT scaling) and RGB conversion. A bad image raises ``ImageRejected`` with the
reason, never a PIL exception."""
from __future__ import annotations

import io
from typing import Any

import imagesize
import numpy as np
from PIL import Image

from curate.core.timeouts import SampleTimeout, TimeLimiter

# We check pixels ourselves from the header (``max_pixels``) before any decode.
Image.MAX_IMAGE_PIXELS = None

PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP",
               "tif": "TIFF", "tiff": "TIFF"}


class ImageRejected(Exception):
    """A sample-level verdict reached before measuring (bomb, undecodable); str() is the reason."""


def open_image(data: bytes, ext: str | None) -> Image.Image:
    """PIL image (pixels not decoded). The extension is tried first: telling PIL the format skips
    its plugin probing; a mislabelled file falls back to probing every format."""
    hint = PIL_FORMATS.get(ext or "")
    if hint:
        try:
            return Image.open(io.BytesIO(data), formats=[hint])
        except Exception:  # mislabelled extension: probe every format below
            pass
    return Image.open(io.BytesIO(data))


# Signatures of the formats whose sizes imagesize reads (the first bytes of the file).
_SIGNATURES = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"),
               (b"GIF89a", "gif"), (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def _signature_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((fmt for sig, fmt in _SIGNATURES if data.startswith(sig)), None)


def image_header(data: bytes, ext: str | None = None) -> tuple[str | None, int | None, int | None]:
    """(format, width, height) from the image header without decoding pixels; Nones for garbage.

    The common formats are read by imagesize (a few header bytes, no PIL plugin: the index stage
    runs this for every sample); sizes are as stored, EXIF orientation not applied, as PIL reports
    them. Anything imagesize cannot size goes to PIL, which judges it."""
    fmt = _signature_format(data)
    if fmt is not None:
        try:
            w, h = imagesize.get(io.BytesIO(data), exif_rotation=False)
        except Exception:  # a damaged header: PIL below decides
            w = h = -1
        if w > 0 and h > 0:
            return fmt, int(w), int(h)
    try:
        with open_image(data, ext) as im:
            return (im.format or "").lower() or None, int(im.width), int(im.height)
    except Exception:  # PIL raises many types for garbage; a bad header is data, not an error
        return None, None, None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit and float greyscale are scaled, not clipped; alpha dropped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_checked(data: bytes | None, ext: str | None, max_pixels: int) -> tuple[Image.Image, dict[str, Any]]:
    """The opened image (pixels not decoded yet) and its header info; bombs and bad headers are
    reasons (``image:missing``, ``image:undecodable``, ``image:too_many_pixels``)."""
    if not data:
        raise ImageRejected("image:missing")
    try:
        im = open_image(data, ext)
    except Exception as e:
        raise ImageRejected("image:undecodable") from e
    info = {"format": (im.format or "").lower() or None, "mode": im.mode,
            "n_frames": int(getattr(im, "n_frames", 1) or 1), "w": im.width, "h": im.height}
    if im.width * im.height > max_pixels:
        im.close()
        raise ImageRejected("image:too_many_pixels")
    return im, info


def header_info(data: bytes, ext: str | None, max_pixels: int) -> dict[str, Any]:
    """Format, mode, frames and size from the image header alone (no pixel is decoded)."""
    im, info = open_checked(data, ext, max_pixels)
    im.close()
    return info


def draft_short_side(im: Image.Image, size: int) -> None:
    """Ask a JPEG to decode DCT-scaled so that its short side stays at least ``size`` (a model's
    input resize then starts from fewer pixels); other formats and small images are left alone."""
    k = size / min(im.width, im.height)
    if im.format == "JPEG" and k < 1:
        im.draft("RGB", (max(1, int(im.width * k)), max(1, int(im.height * k))))


def reduced_decode(data: bytes, ext: str | None, thumb: int, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(RGB uint8 array at most ``thumb`` px a side, header info) without a full decode."""
    im, info = open_checked(data, ext, max_pixels)
    with im:
        try:
            if im.format == "JPEG":
                # DCT scaling decodes at 1/2, 1/4 or 1/8 size; the request must keep the aspect
                # ratio, or PIL picks a larger scale to satisfy the short side.
                k = thumb / max(im.width, im.height)
                im.draft("RGB", (max(1, int(im.width * k)), max(1, int(im.height * k))))
            im.thumbnail((thumb, thumb), reducing_gap=2.0)
            arr = np.asarray(to_rgb(im))
        except Exception as e:  # truncated, corrupt, unsupported mode: a reason, not a crash
            raise ImageRejected("image:undecodable") from e
    if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageRejected("image:undecodable")
    return arr, info


def decode_within(limiter: TimeLimiter, data: bytes | None, ext: str | None, side: int, max_pixels: int,
                  prefix: str = "image") -> tuple[np.ndarray | None, dict[str, Any] | None, str | None]:
    """``reduced_decode`` under the stage's time limit: (pixels, header info, None), or (None,
    None, reason) with the reason in the stage's own words (``<prefix>:undecodable``,
    ``<prefix>:decode_timeout``, ...). Every stage that decodes pixels goes through here."""
    try:
        rgb, info = limiter.call(reduced_decode, data, ext, side, max_pixels)
    except ImageRejected as r:  # "image:undecodable" -> "<prefix>:undecodable"
        return None, None, f"{prefix}:{str(r).split(':', 1)[1]}"
    except SampleTimeout:
        return None, None, f"{prefix}:decode_timeout"
    return rgb, info, None
