"""The CLIP data path: a shard's images and captions into model batches, and the batches through
the forward.

``ClipBatches(clip, settings)`` yields ``(rows, images, failures, tokens)`` per batch from a tar path
or a ``ShardContext.reader()``: through torch DataLoader processes (``models/clip_loader.py``),
with the JPEGs decoded on the device where enabled (``models/device_preprocess.py``, nvJPEG), or
through NVIDIA DALI's reader and decoder (``models/dali_pipeline.py``) for a local plain tar.
``embed_batches`` runs them through a ``ClipForward``, halving the batch on CUDA out-of-memory.
The ``clip_score`` stage composes the two.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from curate.core.background import in_background
from curate.io.tar_members import is_local_plain_tar
from curate.models.clip_forward import ClipForward
from curate.models.clip_loader import RowTokens, ShardImages, collate, image_size, shard_images_dataset

log = logging.getLogger(__name__)

Shard = str | Callable[..., Iterator[tuple[int, Any]]]
Batch = tuple[list[int], Any, list, Any]


@dataclass(frozen=True)
class DataPathSettings:
    """How images reach the model (the ``clip_score`` parameters of the same names)."""

    batch_size: int = 256
    loader_workers: int | None = None
    max_pixels: int = 100_000_000
    jpeg_draft: bool = True
    decode_timeout_s: float | None = 30.0
    device_decode: bool | None = None
    device_decoder: str = "nvjpeg"


def loader_processes(setting: int | None, device: str) -> int:
    """DataLoader processes the loader path starts: the setting, else (on cuda) all cores but one
    up to 8; none on a daemonic process, which cannot start them."""
    n = setting
    if n is None:
        n = min(8, (os.cpu_count() or 1) - 1) if device == "cuda" else 0
    if n and multiprocessing.current_process().daemon:
        log.info("daemonic worker process: image decoding runs in-process (set "
                 "distributed.worker.daemon=False to allow DataLoader workers)")
        n = 0
    return n


def device_preprocess(clip: Any, device: str, settings: DataPathSettings) -> Any:
    """The on-device JPEG decode + preprocessing when enabled and possible, else None."""
    from curate.models.dali_preprocess import DaliPreprocess
    from curate.models.device_preprocess import DevicePreprocess

    on = settings.device_decode
    if on is None:
        on = device == "cuda"
    if not on:
        return None
    kind = DaliPreprocess if settings.device_decoder == "dali" else DevicePreprocess
    return kind.from_transform(clip.preprocess)


def model_input_size(clip: Any) -> int:
    """The model's square input side."""
    return int(clip.info.get("image_size") or image_size(clip.preprocess))


class ClipBatches:
    """The batches of one loaded model; the DALI pipeline, when used, is built once per process."""

    def __init__(self, clip: Any, settings: DataPathSettings):
        self.clip, self.settings = clip, settings
        self._dali = None

    def __call__(self, shard: Shard, rows: list[int], captions: list[str], device: str,
                 masks: dict[int, list] | None = None, keys: list[str] | None = None) -> Iterator[Batch]:
        """(rows, images, failures, tokens) per batch. With ``device_decoder: dali`` and a local tar,
        a DALI pipeline reads and decodes; ``keys`` (the index's) are checked against the tar there."""
        from curate.models.dali_pipeline import ShardPipeline
        from curate.models.dali_preprocess import DaliPreprocess

        on_device = device_preprocess(self.clip, device, self.settings)
        if isinstance(on_device, DaliPreprocess) and not masks and is_local_plain_tar(shard):
            if self._dali is None:  # one per process: its decoder takes seconds to build
                self._dali = ShardPipeline(on_device, device, self._dali_threads(device), self.settings.batch_size)
            return self._dali_batches(self._dali, shard, rows, captions, keys, device)
        return self.loader_batches(shard, rows, captions, device, masks)

    def loader_batches(self, shard: Shard, rows: list[int], captions: list[str], device: str,
                       masks: dict[int, list] | None = None, loader_workers: int | None = None) -> Iterator[Batch]:
        """The data path through torch DataLoader processes (each streams the tar for its share of
        rows), with device decoding where enabled; ``loader_workers``: override the setting."""
        import torch

        s, clip = self.settings, self.clip
        size = model_input_size(clip)
        on_device = device_preprocess(clip, device, s)
        ds = shard_images_dataset()(shard, rows, clip.preprocess, draft=2 * size if s.jpeg_draft else 0,
                                    max_pixels=s.max_pixels, timeout_s=s.decode_timeout_s,
                                    captions={r: captions[r] for r in rows}, raw_jpeg=on_device is not None,
                                    masks=masks)
        nw = loader_processes(s.loader_workers, device) if loader_workers is None else loader_workers
        loader = torch.utils.data.DataLoader(ds, batch_size=s.batch_size, num_workers=nw,
                                             collate_fn=functools.partial(collate, tokenizer=clip.tokenizer),
                                             # pinning would copy every JPEG byte once more; the
                                             # device decoders take pageable buffers
                                             pin_memory=device == "cuda" and on_device is None,
                                             prefetch_factor=4 if nw else None,
                                             persistent_workers=False)
        return self._model_batches(loader, on_device, device, nw)

    def _dali_threads(self, device: str) -> int:
        """DALI's reader and decoder threads: the loader_workers setting, else all cores but two."""
        if self.settings.loader_workers:
            return self.settings.loader_workers
        return max(2, min(16, (os.cpu_count() or 4) - 2)) if device == "cuda" else 2

    def _dali_batches(self, pipeline: Any, shard: str, rows: list[int], captions: list[str],
                      keys: list[str] | None, device: str) -> Iterator[Batch]:
        """Model batches through DALI (``models/dali_pipeline.py``): its reader streams the tar, the
        rows to embed whose image it can decode go to its decode pipeline in batches, prepared a
        batch ahead on a helper thread (on a CUDA stream of its own) while captions are tokenised
        on another. Every other row, and each batch DALI fails to decode, goes through
        ``loader_batches``, which gives the standard result row by row."""
        import torch

        from curate.io.shards import SAMPLE_KEY_RE
        from curate.models.dali_pipeline import decodable

        want, size = set(rows), self.settings.batch_size
        # larger images go to the loader path, which decodes them at reduced size
        max_pixels = min(self.settings.max_pixels, ShardImages.RAW_JPEG_MAX_PIXELS)
        slow: list[int] = []
        tokens = RowTokens(self.clip.tokenizer, rows, captions, size)

        def decoded(batch_rows: list[int], encoded: list, stream: Any) -> Batch | None:
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    imgs = pipeline.decode(encoded)
                if stream is not None:
                    stream.synchronize()  # the images are complete before the model stream reads them
            except Exception as e:  # DALI fails a whole batch for one file it cannot decode
                log.warning("shard %s: DALI could not decode a batch (%s); the loader path takes it",
                            shard, str(e).splitlines()[0] if str(e) else type(e).__name__)
                slow.extend(batch_rows)
                return None
            return batch_rows, imgs, [None] * len(batch_rows), tokens.take(batch_rows)

        def produce(stream: Any = None) -> Iterator[Batch]:
            batch_rows: list[int] = []
            encoded: list = []
            seen = -1  # rows up to here are accounted for
            try:
                for row, name, data in pipeline.members(shard, want.__contains__):
                    match = SAMPLE_KEY_RE.match(name) if name else None
                    if match and keys is not None and row < len(keys) and match.group(1) != keys[row]:
                        # the shard changed since indexing, or DALI groups its members otherwise
                        log.warning("shard %s: DALI's sample %d is %s, the index says %s; the loader path "
                                    "takes the rest", shard, row, match.group(1), keys[row])
                        break
                    seen = row
                    if row not in want:
                        continue
                    if match is None or not decodable(data, max_pixels):
                        slow.append(row)
                        continue
                    batch_rows.append(row)
                    encoded.append(data)
                    if len(batch_rows) == size:
                        out = decoded(batch_rows, encoded, stream)
                        if out is not None:
                            yield out
                        batch_rows, encoded = [], []
            except Exception as e:  # a tar DALI's reader cannot read to the end
                log.warning("shard %s: DALI's reader stopped (%s); the loader path takes the rest", shard,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
            if batch_rows:
                out = decoded(batch_rows, encoded, stream)
                if out is not None:
                    yield out
            slow.extend(r for r in rows if r > seen)  # past the tar's end: the loader path reports them

        stream = torch.cuda.Stream() if device == "cuda" else None
        try:
            for batch_rows, imgs, failures, toks in in_background(produce(stream), depth=2, name="clip-dali"):
                if imgs.is_cuda:
                    imgs.record_stream(torch.cuda.current_stream())  # freed memory waits for the model's use
                yield batch_rows, imgs, failures, toks
        finally:
            tokens.close()
        if slow:
            # in this process: a loader process forked after DALI has run inherits its decoder
            # state, whose teardown fails in the child
            yield from self.loader_batches(shard, sorted(slow), captions, device, loader_workers=0)

    def _model_batches(self, loader: Any, on_device: Any, device: str, loader_workers: int) -> Iterator[Batch]:
        """(rows, images, failures, tokens) per loader batch. A helper thread prepares the next
        batch while the model runs this one: with device decoding (on its own CUDA stream), and
        when there are no loader processes (a daemonic Dask worker cannot start them; PIL and
        torch release the GIL while they decode and compute, so the two overlap)."""
        import torch

        def prepare(stream: Any = None) -> Iterator[Batch]:
            for batch in loader:
                failures = list(batch["failures"])
                if stream is None:
                    imgs = _batch_images(batch, on_device, device, failures)
                else:
                    with torch.cuda.stream(stream):
                        imgs = _batch_images(batch, on_device, device, failures)
                    stream.synchronize()  # the images are complete before the model stream reads them
                yield batch["rows"], imgs, failures, batch["tokens"]

        if on_device is None or device != "cuda":
            yield from (prepare() if loader_workers else in_background(prepare(), depth=2, name="clip-decode"))
            return
        for rows, imgs, failures, tokens in in_background(prepare(torch.cuda.Stream()), depth=2, name="clip-decode"):
            if imgs is not None and imgs.is_cuda:
                imgs.record_stream(torch.cuda.current_stream())  # freed memory waits for the model's use
            yield rows, imgs, failures, tokens


def _batch_images(batch: dict[str, Any], on_device: Any, device: str, failures: list) -> Any:
    """The batch's model input: CPU-preprocessed rows plus JPEGs decoded on the device.
    Rows whose device decode fails get ``clip:undecodable`` in ``failures``."""
    import torch

    imgs = batch["images"]
    if not batch["jpeg_pos"]:
        return imgs
    crop = on_device.crop
    imgs = (imgs.to(device, non_blocking=True) if imgs is not None
            else torch.zeros(len(batch["rows"]), 3, crop, crop, device=device))
    decoded, bad = on_device.images(list(torch.split(batch["jpegs"], batch["jpeg_sizes"])), device)
    for k in bad:
        failures[batch["jpeg_pos"][k]] = "clip:undecodable"
    imgs[batch["jpeg_pos"]] = decoded
    return imgs


def embed_batches(forward: ClipForward, batches: Iterator[Batch], batch_size: int,
                  on_batch: Callable[[int], None] | None = None
                  ) -> tuple[dict[int, tuple[float, Any, Any]], dict[int, str]]:
    """{row: (score, image_emb, text_emb)} and {row: reason} for images that failed to decode; on
    CUDA out-of-memory the forward's batch is halved and the chunk tried again."""
    import torch

    forward.reset_cache()
    out: dict[int, tuple[float, Any, Any]] = {}
    failed: dict[int, str] = {}
    chunk = batch_size
    for batch_rows, imgs, failures, tokens in batches:
        if on_batch is not None:
            on_batch(len(batch_rows))
        failed.update((r, why) for r, why in zip(batch_rows, failures) if why is not None)
        good_idx = [j for j, why in enumerate(failures) if why is None]
        if not good_idx:
            continue
        if len(good_idx) < len(batch_rows):
            imgs, tokens = imgs[good_idx], tokens[good_idx]
        start = 0
        while start < len(good_idx):
            try:
                sc, ie, te = forward(imgs[start:start + chunk], tokens[start:start + chunk])
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = forward.batch_size = max(1, chunk // 2)
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: batch reduced to %d", chunk)
                continue
            for k in range(len(sc)):
                out[batch_rows[good_idx[start + k]]] = (float(sc[k]), ie[k], te[k])
            start += len(sc)
    return out, failed
