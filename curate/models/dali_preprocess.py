"""JPEG decode and CLIP preprocessing with NVIDIA DALI (an optional extra: ``pip install -e '.[gpu]'``).

On an A100/H100 DALI's ``decoders.image`` on the ``gpu`` device uses the hardware JPEG decoder
beside the CUDA cores (``hw_decoder_load`` is the share of each batch it takes), and the resize,
centre crop and normalisation run on the GPU in the same call, so the loader processes only read
the tar. Without a GPU the same operators run on the CPU, which is how the tests check it.

It reproduces open_clip's transform as ``DevicePreprocess`` describes it (bicubic antialiased
resize of the short side, centre crop, the model's mean/std on 0-255 values), to within decoder and
resampling rounding; transforms it does not recognise switch it off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from curate.models.device_preprocess import DevicePreprocess, decode_bisecting

log = logging.getLogger(__name__)


def dali_available() -> bool:
    """Whether DALI's dynamic mode (the API used here, DALI >= 2.0) can be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali.experimental.dynamic") is not None
    except ImportError:  # no nvidia.dali package at all
        return False


@dataclass(frozen=True)
class DaliPreprocess:
    spec: DevicePreprocess
    hw_decoder_load: float = 0.75

    @classmethod
    def from_transform(cls, transform: Any) -> DaliPreprocess | None:
        spec = DevicePreprocess.from_transform(transform)
        return cls(spec) if spec is not None else None

    @property
    def crop(self) -> int:
        return self.spec.crop

    def images(self, jpegs: list, device: str) -> tuple[Any, list[int]]:
        """(N, 3, crop, crop) float32 model input on ``device`` for N JPEG byte tensors, zeros where
        a JPEG failed to decode, and the indices that failed (DALI fails a whole batch for one
        corrupt file: ``decode_bisecting`` isolates it)."""
        import torch

        arrays = [j.numpy() for j in jpegs]
        found, failed = decode_bisecting(len(arrays), lambda idx: self._run([arrays[i] for i in idx], device))
        if not failed:
            return torch.stack([found[i] for i in range(len(arrays))]), []
        out = torch.zeros(len(jpegs), 3, self.crop, self.crop, device=device)
        for i, im in found.items():
            out[i] = im
        return out, failed

    def _run(self, arrays: list, device: str):
        import numpy as np
        import nvidia.dali.experimental.dynamic as ndd
        import nvidia.dali.types as types

        gpu = device == "cuda"
        extra = {"hw_decoder_load": self.hw_decoder_load} if gpu else {}
        images = ndd.decoders.image(ndd.batch(arrays), device="gpu" if gpu else "cpu",
                                    output_type=types.RGB, **extra)
        # each image's size as torchvision's Resize(int) computes it (the long side truncated);
        # DALI's resize_shorter rounds it, which shifts the sampling grid of the whole image
        sizes = [self.spec.resized(h, w) for h, w, _ in images.shape]
        images = ndd.resize(images, size=ndd.batch([np.array(hw, dtype=np.float32) for hw in sizes]),
                            interp_type=types.INTERP_CUBIC, antialias=True)
        return self._crop_normalise(images.torch(pad=True), sizes)

    def _crop_normalise(self, padded, sizes: list[tuple[int, int]]):
        """Centre crops (torchvision's offsets: half the margin, rounded half to even) of a padded
        (N, H, W, 3) uint8 batch, normalised to (N, 3, crop, crop) float32, in one gather."""
        import torch

        c, dev = self.crop, padded.device
        top = torch.tensor([round((h - c) / 2.0) for h, _ in sizes], device=dev)
        left = torch.tensor([round((w - c) / 2.0) for _, w in sizes], device=dev)
        span = torch.arange(c, device=dev)
        n = torch.arange(len(sizes), device=dev)[:, None, None]
        x = padded[n, (top[:, None] + span)[:, :, None], (left[:, None] + span)[:, None, :]]
        return self.spec.normalise(x.permute(0, 3, 1, 2).float())
