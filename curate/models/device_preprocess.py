"""JPEG decode and CLIP preprocessing on the model's device (nvJPEG + torch on a GPU).

On a GPU the forward pass of a CLIP model outruns what a few CPU cores can decode and resize (the
docs' performance page has the figures). So the loader workers only
read the tar and check the header, and the JPEG bytes are decoded in batches by torchvision's
nvJPEG binding, then resized, cropped and normalised with torch on the device.

The result follows open_clip's own transform (bicubic, antialiased resize of the short side,
centre crop, the model's mean/std) to within JPEG-decoder and resampling rounding; the stage
records which path scored a shard. Transforms we do not recognise switch this path off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePreprocess:
    resize: int  # shorter side after resizing
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, transform: Any) -> DevicePreprocess | None:
        """The equivalent of an open_clip ``Compose(Resize, CenterCrop, ..., Normalize)``, or None
        when the transform holds a step we would not reproduce exactly."""
        from torchvision import transforms as T

        resize = crop = mean = std = None
        for t in getattr(transform, "transforms", [transform]):
            kind = type(t).__name__
            if isinstance(t, T.Resize):
                size = t.size if isinstance(t.size, int) else (t.size[0] if len(t.size) == 1 else None)
                if size is None or t.max_size is not None or t.interpolation != T.InterpolationMode.BICUBIC:
                    return None
                resize = int(size)
            elif isinstance(t, T.CenterCrop):
                h, w = t.size
                if h != w:
                    return None
                crop = int(h)
            elif isinstance(t, T.Normalize):
                mean, std = tuple(map(float, t.mean)), tuple(map(float, t.std))
            elif kind in ("MaybeConvertMode", "MaybeToTensor", "ToTensor") or getattr(t, "__name__", "") == "_convert_to_rgb":
                continue
            else:
                log.info("device preprocessing off: transform step %s is not supported", kind)
                return None
        if None in (resize, crop, mean, std) or resize < crop:  # type: ignore[operator]
            return None
        return cls(resize, crop, mean, std)  # type: ignore[arg-type]

    def resized(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after torchvision's Resize(int): the short side becomes ``resize``,
        the long side truncates."""
        if h <= w:
            return self.resize, int(self.resize * w / h)
        return int(self.resize * h / w), self.resize

    def decode(self, jpegs: list, device: str) -> tuple[list, list[int]]:
        """Decode JPEG byte tensors to RGB uint8 CHW tensors on ``device``.
        Returns (images with None for failures, indices that failed)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        found, failed = decode_bisecting(len(jpegs), lambda idx: decode_jpeg([jpegs[i] for i in idx],
                                                                              mode=ImageReadMode.RGB, device=device))
        return [found.get(i) for i in range(len(jpegs))], failed

    def images(self, jpegs: list, device: str) -> tuple[Any, list[int]]:
        """(N, 3, crop, crop) model input for N JPEG byte tensors, zeros where a JPEG failed to
        decode, and the indices that failed."""
        import torch

        decoded, failed = self.decode(jpegs, device)
        out = torch.zeros(len(jpegs), 3, self.crop, self.crop, device=device)
        ok = [k for k, im in enumerate(decoded) if im is not None]
        if ok:
            out[ok] = self([decoded[k] for k in ok])
        return out, failed

    def __call__(self, images: list) -> Any:
        """(N, 3, crop, crop) float32 model input from RGB uint8 CHW tensors of any sizes."""
        import torch
        import torch.nn.functional as F

        device = images[0].device
        out = torch.empty(len(images), 3, self.crop, self.crop, device=device)
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            nh, nw = self.resized(h, w)
            x = im.unsqueeze(0).float()
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = int(round((nh - self.crop) / 2.0)), int(round((nw - self.crop) / 2.0))
            out[i] = x[0, :, top:top + self.crop, left:left + self.crop]
        # PIL resizes in uint8: round and clip the same way before scaling
        return self.normalise(out.round_().clamp_(0, 255))

    def normalise(self, x: Any) -> Any:
        """(N, 3, H, W) float32 pixel values in 0-255 to the model's input, in place."""
        import torch

        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.div_(255.0).sub_(mean).div_(std)


def decode_bisecting(n: int, run: Callable[[list[int]], Sequence[Any]]) -> tuple[dict[int, Any], list[int]]:
    """Results of ``run`` over items ``0..n-1``, for a batch decoder that fails a whole batch when
    one item is corrupt: a failed batch is split in halves until each corrupt item stands alone, so
    k corrupt items cost about 2k log2(n) extra calls, not n. Returns ({index: result}, failed)."""
    found: dict[int, Any] = {}
    failed: list[int] = []
    todo = [list(range(n))] if n else []
    while todo:
        idx = todo.pop()
        try:
            found.update(zip(idx, run(idx)))
        except RuntimeError:
            if len(idx) == 1:
                failed.append(idx[0])
            else:
                todo += [idx[len(idx) // 2:], idx[:len(idx) // 2]]
    return found, sorted(failed)
