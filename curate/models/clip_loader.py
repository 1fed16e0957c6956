"""The CPU side of clip_score's data path: the rows of a shard as a torch IterableDataset
(each loader worker streams the tar for its share of rows and decodes with PIL, or hands plain
JPEG bytes on for the device to decode), the batch collation, and the captions tokenised on a
helper thread for the DALI path (which has no loader processes to tokenise in)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import numpy as np

from curate.algorithms.text_regions import fill_regions
from curate.core.background import in_background
from curate.core.timeouts import SampleTimeout, TimeLimiter
from curate.io.images import draft_short_side, open_checked, to_rgb
from curate.io.shards import iter_indexed_samples


def shard_images_dataset():
    """The IterableDataset class, built on first use: importing this module does not load torch."""
    import torch

    return type("ShardImagesDataset", (ShardImages, torch.utils.data.IterableDataset), {})


class ShardImages:
    """The rows to embed, as an IterableDataset (see shard_images_dataset) of
    ``(row, payload, reason, caption, is_jpeg)``: the payload is the preprocessed image tensor, or,
    with ``raw_jpeg``, the undecoded bytes of a plain RGB/greyscale JPEG, left for the device to
    decode. Each loader worker streams the tar and handles only its share of rows, so memory stays
    bounded by the batch, not the shard."""

    # Larger JPEGs are decoded on the CPU at a DCT-reduced size instead: a batch of full-size
    # camera photos decoded on the GPU would take gigabytes before the resize.
    RAW_JPEG_MAX_PIXELS = 2048 * 2048

    def __init__(self, shard: str | Callable[..., Iterator[tuple[int, Any]]], rows: list[int], preprocess,
                 draft: int, max_pixels: int, timeout_s: float | None = None,
                 captions: dict[int, str] | None = None, raw_jpeg: bool = False,
                 masks: dict[int, list] | None = None):
        # a tar path, or a reader as ShardContext.reader() gives it (the fused task's one read)
        self.read = functools.partial(iter_indexed_samples, shard) if isinstance(shard, str) else shard
        self.rows, self.preprocess = set(rows), preprocess
        self.draft, self.max_pixels, self.raw_jpeg = draft, max_pixels, raw_jpeg
        self.limiter = TimeLimiter(timeout_s, name="clip-decode")
        self.captions = captions or {}
        self.masks = masks or {}  # row -> text boxes to fill before preprocessing (T-MARS)

    def __iter__(self) -> Iterator[tuple[int, Any, str | None, str, bool]]:
        import torch

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # every nw-th row to embed; the reader skips the other rows' data without reading it
        mine = {r for k, r in enumerate(sorted(self.rows)) if k % nw == wid}
        for i, s in self.read(None, mine.__contains__):
            payload, reason = self._decode(s.image(), s.image_ext(), self.masks.get(i))
            is_jpeg = reason is None and payload.dtype == torch.uint8
            yield i, payload, reason, self.captions.get(i) or "", is_jpeg

    def _decode(self, data: bytes | None, ext: str | None, boxes: list | None = None) -> tuple[Any, str | None]:
        """(tensor, None) or (placeholder, reason)."""
        import torch

        try:
            return self.limiter.call(self._preprocess, data, ext, boxes), None
        except SampleTimeout:
            return torch.zeros(3, 1, 1), "clip:decode_timeout"
        except Exception:  # any decode failure is a per-row reason, never a crashed shard
            return torch.zeros(3, 1, 1), "clip:undecodable"

    def _preprocess(self, data: bytes | None, ext: str | None, boxes: list | None = None):
        import torch

        im, _ = open_checked(data, ext, self.max_pixels)
        if (self.raw_jpeg and not boxes and im.format == "JPEG" and im.mode in ("RGB", "L")
                and im.width * im.height <= self.RAW_JPEG_MAX_PIXELS):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.draft:
            draft_short_side(im, self.draft)
        im = to_rgb(im)
        if boxes:
            from PIL import Image

            im = Image.fromarray(fill_regions(np.asarray(im), boxes))
        return self.preprocess(im)


class RowTokens:
    """Caption tokens of ``rows``, tokenised in order on a helper thread a few batches ahead;
    ``take`` returns those of any rows, in the order asked."""

    def __init__(self, tokenizer, rows: list[int], captions: list[str], size: int):
        chunks = [rows[k:k + size] for k in range(0, len(rows), size)]
        self._chunks = in_background(((c, tokenizer([captions[r] or "" for r in c])) for c in chunks),
                                     depth=4, name="clip-tokens")
        self._have: dict[int, Any] = {}

    def take(self, rows: list[int]):
        import torch

        while any(r not in self._have for r in rows):
            chunk, toks = next(self._chunks)
            self._have.update(zip(chunk, toks))
        return torch.stack([self._have.pop(r) for r in rows])

    def close(self) -> None:
        self._chunks.close()


def collate(batch, tokenizer) -> dict[str, Any]:
    """One loader batch: rows, the CPU-preprocessed images stacked (zeros where a row failed or
    waits for device decoding), JPEG bytes to decode on the device with their positions, per-row
    failure reasons, and the captions tokenised as one batch. The collate function runs in the
    loader workers when there are any, so tokenising here keeps it off the forward loop."""
    import torch

    ready = [b[2] is None and not b[4] for b in batch]  # preprocessed here, nothing left to do
    shape = next((b[1].shape for b, r in zip(batch, ready) if r), None)
    images = None if shape is None else torch.stack([b[1] if r else torch.zeros(shape) for b, r in zip(batch, ready)])
    jpeg_pos = [j for j, b in enumerate(batch) if b[4]]
    # one buffer, not one tensor per file: each tensor crossing from a loader worker costs a
    # shared-memory segment and a file descriptor
    jpegs = torch.cat([batch[j][1] for j in jpeg_pos]) if jpeg_pos else None
    return {"rows": [b[0] for b in batch], "images": images, "jpeg_pos": jpeg_pos, "jpegs": jpegs,
            "jpeg_sizes": [len(batch[j][1]) for j in jpeg_pos], "failures": [b[2] for b in batch],
            "tokens": tokenizer([b[3] for b in batch])}


def image_size(preprocess) -> int:
    """The model's input side from its open_clip transform (224 when none names it)."""
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, (tuple, list)) and size:
            return int(size[0])
        if isinstance(size, int):
            return size
    return 224
