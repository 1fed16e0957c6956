"""CLIP's model input from a local tar with NVIDIA DALI: DALI's tar reader and DALI's decoder.

torch DataLoader processes that each parse every tar header in Python and hand their bytes to the
main process cannot feed a GPU's forward, whatever the decoder (figures on the docs' performance
page). Here DALI's own WebDataset reader (C++ threads, its own index of the tar) fetches each
sample's image member, and a decode pipeline (``decoders.image`` on the GPU's hardware JPEG decoder,
exact resize, padding into one batch) turns batches of those bytes into pixels. Building a decode
pipeline is slow (decoder initialisation), so one is built per ``ShardPipeline`` and reused for
every shard; a reader is cheap and is built per shard.

The result is open_clip's transform as ``DaliPreprocess`` reproduces it: each image resized to the
exact size torchvision's ``Resize(int)`` gives (the long side truncated, computed in the pipeline
from the header), EXIF orientation ignored as PIL's ``open`` ignores it, then cropped with
torchvision's offsets and normalised in torch. A file DALI cannot decode fails its whole batch:
``decode`` raises and the caller gives that batch's rows to its loader path, which isolates the
file; the pipeline stays usable for the next batch (DALI 2.4, checked on its CPU operators).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from curate.io.shards import IMAGE_EXTS, MAX_MEMBER_BYTES
from curate.models.dali_preprocess import DaliPreprocess

# formats the decode pipeline takes (as image_header names them); others stay on the loader path
PIPELINE_FORMATS = ("jpeg", "png", "webp")
# the reader matches extensions as written; our reader lower-cases them
_READER_EXTS = ";".join([*IMAGE_EXTS, *(e.upper() for e in IMAGE_EXTS)])


def decodable(data: np.ndarray, max_pixels: int) -> bool:
    """Whether image bytes go through the decode pipeline: a header that parses (read without
    PIL) as a format the pipeline decodes, with at most ``max_pixels`` pixels. DALI must never see
    a header it cannot parse: its shape probe then fails the whole process, not only the batch."""
    from curate.io.images import image_header

    if not 0 < len(data) <= MAX_MEMBER_BYTES:
        return False
    fmt, w, h = image_header(data[:65536].tobytes())
    return fmt in PIPELINE_FORMATS and bool(w) and bool(h) and w * h <= max_pixels


class ShardPipeline:
    """A tar's image members, and their model input, through DALI."""

    def __init__(self, preprocess: DaliPreprocess, device: str, threads: int, batch_size: int):
        self.pre, self.device = preprocess, device
        self.threads, self.batch_size = max(1, threads), batch_size
        self._decoder = None

    def members(self, tar: str, want: Callable[[int], bool]) -> Iterator[tuple[int, str | None, np.ndarray | None]]:
        """(row, member name, bytes) of each sample's image in tar order: the name is None where
        the sample has none, the bytes are None there and for rows ``want`` declines, else a copy
        (DALI reuses its buffers). Raises what DALI raises for a tar it cannot read."""
        import nvidia.dali.fn as fn
        from nvidia.dali import pipeline_def

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=None, prefetch_queue_depth=2)
        def reader():
            return fn.readers.webdataset(paths=[tar], ext=[_READER_EXTS], missing_component_behavior="empty",
                                         name="reader")

        pipe = reader()
        pipe.build()
        left = int(pipe.reader_meta("reader")["epoch_size"])  # the reader wraps around after the last sample
        prefix, row = f"{tar}:", 0
        while left > 0:
            (batch,) = pipe.run()
            for j in range(min(left, len(batch))):
                t = batch[j]
                info = t.source_info()  # "<tar>:<offset>:<member name>"
                rest = info[len(prefix):] if info.startswith(prefix) else ""
                name = rest.split(":", 1)[1] if t.shape()[0] and ":" in rest else None
                yield row, name, (np.array(t, dtype=np.uint8).reshape(-1) if name and want(row) else None)
                row += 1
            left -= len(batch)

    def decode(self, encoded: list[np.ndarray]) -> Any:
        """(n, 3, crop, crop) float32 model input on the device for n encoded images (at most
        ``batch_size``), on torch's current stream. Raises if DALI cannot decode one of them."""
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._decoder is None:
            self._decoder = self._decode_pipeline()
        pipe = self._decoder  # a batch that fails leaves it usable for the next one
        pipe.feed_input("encoded", encoded)
        images, heights, widths = pipe.run()
        if self.device == "cuda":
            images = images.as_tensor()
            out = torch.empty(images.shape(), dtype=torch.uint8, device="cuda")
            feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream())
        else:
            out = torch.from_numpy(np.array(images.as_tensor()))
        sizes = list(zip(np.array(heights.as_tensor()).reshape(-1).tolist(),
                         np.array(widths.as_tensor()).reshape(-1).tolist()))
        return self.pre._crop_normalise(out, sizes)

    def _decode_pipeline(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device == "cuda"
        resize = self.pre.spec.resize

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=0 if gpu else None,
                      prefetch_queue_depth=1)
        def decoder():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            shape = fn.peek_image_shape(data, adjust_orientation=False, dtype=types.INT64)
            h, w = shape[0], shape[1]
            short = dmath.min(h, w)
            # torchvision's Resize(int): the short side becomes `resize`, the long side truncates
            nh, nw = (h * resize) // short, (w * resize) // short
            extra = {"hw_decoder_load": self.pre.hw_decoder_load} if gpu else {}
            images = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False, **extra)
            images = fn.resize(images, resize_y=fn.cast(nh, dtype=types.FLOAT), resize_x=fn.cast(nw, dtype=types.FLOAT),
                               interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.pad(images, fill_value=0), nh, nw

        pipe = decoder()
        pipe.build()
        return pipe
