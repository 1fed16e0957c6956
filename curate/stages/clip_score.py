"""CLIP score: batched open_clip inference per shard (map), then a global threshold (clip_rank).

``clip_score`` writes the cosine similarity of L2-normalised image and text embeddings (as
DataComp) and both embeddings as float16 fixed-size lists, row order tied to uid, because dedup and
the reference-set filter reuse them. ``clip_rank`` keeps the top fraction of the whole pool (one
global threshold, ties broken by uid), the samples above an absolute score, or the samples above a
score calibrated on held-out pairs for this very scorer (``stages/clip_calibration.py``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.engine.background import in_background
from curate.core.config import Strict, require_exactly_one
from curate.algorithms.text_regions import fill_regions
from curate.io.embeddings import fixed_list
from curate.io.images import draft_short_side, open_checked, to_rgb
from curate.io.parquet import read_table, write_table
from curate.io import storage
from curate.io.shards import expand_input, iter_indexed_samples
from curate.models.clip_forward import ClipForward
from curate.stages.base import GlobalContext, GlobalStage, MapStage, ShardContext, StageOutput
from curate.stages.clip_calibration import Calibration, choose_threshold, heldout_captions, heldout_scores
from curate.stages.registry import register_stage
from curate.engine.timeouts import SampleTimeout, TimeLimiter

log = logging.getLogger(__name__)


def _dataset_class():
    """The IterableDataset class, built on first use: importing this module does not load torch."""
    import torch

    return type("ShardImages", (_ShardImages, torch.utils.data.IterableDataset), {})


class _ShardImages:
    """The rows to embed, as an IterableDataset (see _dataset_class) of
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


class _RowTokens:
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


def _local_plain_tar(shard: object) -> bool:
    """Whether ``shard`` is an uncompressed tar on the local disk (what DALI's reader can read)."""
    from curate.io.tar_members import _COMPRESSED_MAGIC

    if not isinstance(shard, str) or storage.is_url(shard):
        return False
    try:
        with open(shard, "rb") as f:
            return not f.read(6).startswith(_COMPRESSED_MAGIC)
    except OSError:
        return False


def _collate(batch, tokenizer) -> dict[str, Any]:
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


@register_stage
class ClipScoreStage(MapStage):
    """open_clip image-text cosine score per pair, with float16 image and text embeddings for later stages."""

    name = "clip_score"
    columns = {
        "clip_score": "cosine similarity of the L2-normalised image and caption embeddings",
        "image_emb": "L2-normalised image embedding (float16)",
        "text_emb": "L2-normalised caption embedding (float16)",
    }
    version = "1"

    class Params(Strict):
        model: str = Field("ViT-L-14", description="open_clip model name")
        pretrained: str | None = Field("openai", description="tag, local checkpoint path, or null (random)")
        batch_size: int = Field(256, ge=1, description="images per model forward (halved on CUDA out-of-memory)")
        loader_workers: int | None = Field(None, ge=0, description="null: auto (0 on CPU)")
        precision: str = Field("auto", pattern="^(auto|fp32|bf16|fp16)$", description="auto: fp32 weights with bf16 "
                               "autocast on CUDA; fp32; bf16 or fp16: the weights themselves in that type")
        compile: bool = Field(False, description="torch.compile both towers for the fixed batch size (CUDA graphs "
                                                 "on cuda); the first batches of each worker pay the compilation")
        text_cache: int = Field(100_000, ge=0, description="captions of a shard whose text embeddings are kept, so "
                                                           "a repeated caption is encoded once; 0: none")
        store_embeddings: bool = Field(True, description="keep float16 image/text embeddings (dedup and the reference filter read them)")
        max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb cap (header w*h)")
        jpeg_draft: bool = Field(True, description="DCT-scaled JPEG decode to 2x the model's input size")
        decode_timeout_s: float | None = Field(30.0, gt=0, description="per-image decode limit; null: none")
        device_decode: bool | None = Field(None, description="decode JPEGs and preprocess them on the device; "
                                                             "null: on when the device is cuda")
        device_decoder: str = Field("nvjpeg", pattern="^(nvjpeg|dali)$",
                                    description="how device_decode decodes: nvjpeg (torchvision) or dali (NVIDIA "
                                                "DALI, the GPU's hardware JPEG decoder; pip install -e '.[gpu]')")
        mask_text_from: str | None = Field(None, description="id of a text_mask stage: its text regions are "
                                           "filled with the colour around them before the image is scored (T-MARS)")
        all_rows: bool = Field(False, description="score every row, not only survivors (ablations)")

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._clip = None
        self._forward_fn = None
        self._dali = None
        self._info: dict[str, Any] = {}

    def value_fields(self) -> list[pa.Field]:
        from curate.models.clip import embed_dim

        d = embed_dim(self.params.model)
        f = [pa.field("clip_score", pa.float32())]
        if self.params.store_embeddings:
            f += [pa.field("image_emb", pa.list_(pa.float16(), d)), pa.field("text_emb", pa.list_(pa.float16(), d))]
        return f

    def resources(self, device: str = "cpu") -> dict[str, float] | None:
        return {"GPU": 1} if device == "cuda" else None

    def reads(self) -> tuple[str, ...]:
        return (self.params.mask_text_from,) if self.params.mask_text_from else ()

    def with_earlier(self, earlier: list) -> "ClipScoreStage":
        from curate.core.config import ConfigError

        src = next((s for s in earlier if s.stage_id == self.params.mask_text_from), None)
        if src is not None and "text_boxes" not in {f.name for f in src.value_fields()}:
            raise ConfigError(f"stage {self.stage_id!r} masks the text regions of {src.stage_id!r}, which finds "
                              "none: mask_text_from names a text_mask stage")
        return self

    def needs_pixels(self) -> bool:
        return True

    def provides_embeddings(self) -> bool:
        return self.params.store_embeddings

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        from curate.models.clip import file_sha256, resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(self.params.pretrained, model_cache)
        except Exception:  # reported when the model loads; the fingerprint just stays name-based
            ckpt = None
        return {"checkpoint_sha256": file_sha256(ckpt) if ckpt else None}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        from curate.models.dali_preprocess import dali_available
        from curate.models.weights import weights_problem

        problems = []
        problem = weights_problem(self.params.model, self.params.pretrained, model_cache)
        if problem:
            problems.append(f"{self.stage_id}: {problem}")
        if self.params.device_decoder == "dali" and self.params.device_decode is not False and not dali_available():
            problems.append(f"{self.stage_id}: device_decoder is dali but NVIDIA DALI is not installed "
                            "(pip install -e '.[gpu]', or device_decoder: nvjpeg)")
        return problems

    def clip(self, device: str, model_cache: str | None):
        """The loaded model (once per worker process), with what ``describe`` records about it."""
        if self._clip is None:
            from curate.models.clip import load_clip

            prec = self.params.precision
            if prec == "auto":
                prec = "fp32"  # weights in fp32; autocast picks bf16 on CUDA below
            clip = load_clip(self.params.model, self.params.pretrained, device=device,
                             precision=prec, model_cache=model_cache)
            on_device = self.device_preprocess(clip, device) is not None
            decoder = "DALI" if self.params.device_decoder == "dali" else "nvJPEG"
            self._forward_fn = ClipForward(clip, device, precision=self.params.precision,
                                           compile=self.params.compile, batch_size=self.params.batch_size,
                                           text_cache=self.params.text_cache)
            self._info = dict(clip.info, image_size=clip.info.get("image_size") or _image_size(clip.preprocess),
                              decode=f"device ({decoder} for JPEG)" if on_device else "PIL on the CPU",
                              compiled=self.params.compile, text_prefix=self._forward_fn.trims_text)
            self._clip = clip
        return self._clip

    def describe(self) -> dict[str, Any]:
        return dict(self._info) if self._clip else {"model": self.params.model,
                                                    "pretrained": self.params.pretrained}

    def _loader_workers(self, device: str) -> int:
        n = self.params.loader_workers
        if n is None:
            n = min(8, (os.cpu_count() or 1) - 1) if device == "cuda" else 0
        if n and multiprocessing.current_process().daemon:
            log.info("daemonic worker process: image decoding runs in-process (set "
                     "distributed.worker.daemon=False to allow DataLoader workers)")
            n = 0
        return n

    def device_preprocess(self, clip, device: str):
        """The on-device JPEG decode + preprocessing when enabled and possible, else None."""
        from curate.models.dali_preprocess import DaliPreprocess
        from curate.models.device_preprocess import DevicePreprocess

        on = self.params.device_decode
        if on is None:
            on = device == "cuda"
        if not on:
            return None
        kind = DaliPreprocess if self.params.device_decoder == "dali" else DevicePreprocess
        return kind.from_transform(clip.preprocess)

    def embed(self, shard: str | Callable[..., Iterator[tuple[int, Any]]], rows: list[int], captions: list[str],
              device: str, model_cache: str | None, masks: dict[int, list] | None = None,
              keys: list[str] | None = None) -> tuple[dict[int, tuple[float, Any, Any]], dict[int, str]]:
        """{row: (score, image_emb, text_emb)} and {row: reason} for images that failed to decode;
        ``shard`` is a tar path or a ``ShardContext.reader()``; ``masks``: text boxes per row to fill
        before scoring; ``keys``: the index's sample keys (checked where DALI reads the tar)."""
        import torch

        self.clip(device, model_cache)
        self._forward_fn.reset_cache()
        out: dict[int, tuple[float, Any, Any]] = {}
        failed: dict[int, str] = {}
        chunk = self.params.batch_size
        for batch_rows, imgs, failures, tokens in self.batches(shard, rows, captions, device, masks, keys):
            failed.update((r, why) for r, why in zip(batch_rows, failures) if why is not None)
            good_idx = [j for j, why in enumerate(failures) if why is None]
            if not good_idx:
                continue
            if len(good_idx) < len(batch_rows):
                imgs, tokens = imgs[good_idx], tokens[good_idx]
            start = 0
            while start < len(good_idx):
                try:
                    sc, ie, te = self._forward_fn(imgs[start:start + chunk], tokens[start:start + chunk])
                except torch.cuda.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk = self._forward_fn.batch_size = max(1, chunk // 2)
                    torch.cuda.empty_cache()
                    log.warning("CUDA out of memory: batch reduced to %d", chunk)
                    continue
                for k in range(len(sc)):
                    out[batch_rows[good_idx[start + k]]] = (float(sc[k]), ie[k], te[k])
                start += len(sc)
        return out, failed

    def batches(self, shard: str | Callable[..., Iterator[tuple[int, Any]]], rows: list[int], captions: list[str],
                device: str, masks: dict[int, list] | None = None, keys: list[str] | None = None
                ) -> Iterator[tuple[list[int], Any, list, Any]]:
        """The model's input, (rows, images, failures, tokens) per batch: the data path alone
        (after ``clip()`` has loaded the model). With ``device_decoder: dali`` and a local tar, a
        DALI pipeline reads and decodes; ``keys`` (the index's) are checked against the tar there."""
        from curate.models.dali_pipeline import ShardPipeline
        from curate.models.dali_preprocess import DaliPreprocess

        on_device = self.device_preprocess(self._clip, device)
        if isinstance(on_device, DaliPreprocess) and not masks and _local_plain_tar(shard):
            if self._dali is None:  # one per process: its decoder takes seconds to build
                self._dali = ShardPipeline(on_device, device, self._dali_threads(device), self.params.batch_size)
            return self._dali_batches(self._dali, shard, rows, captions, keys, device)
        return self._loader_batches(shard, rows, captions, device, masks)

    def _loader_batches(self, shard: str | Callable[..., Iterator[tuple[int, Any]]], rows: list[int],
                        captions: list[str], device: str, masks: dict[int, list] | None = None,
                        loader_workers: int | None = None) -> Iterator[tuple[list[int], Any, list, Any]]:
        """The data path through torch DataLoader processes (each streams the tar for its share of
        rows), with device decoding where enabled; ``loader_workers``: override the setting."""
        import torch

        clip = self._clip
        size = self._info["image_size"]
        on_device = self.device_preprocess(clip, device)
        ds = _dataset_class()(shard, rows, clip.preprocess, draft=2 * int(size) if self.params.jpeg_draft else 0,
                                max_pixels=self.params.max_pixels, timeout_s=self.params.decode_timeout_s,
                                captions={r: captions[r] for r in rows}, raw_jpeg=on_device is not None,
                                masks=masks)
        nw = self._loader_workers(device) if loader_workers is None else loader_workers
        loader = torch.utils.data.DataLoader(ds, batch_size=self.params.batch_size, num_workers=nw,
                                             collate_fn=functools.partial(_collate, tokenizer=clip.tokenizer),
                                             # pinning would copy every JPEG byte once more; the
                                             # device decoders take pageable buffers
                                             pin_memory=device == "cuda" and on_device is None,
                                             prefetch_factor=4 if nw else None,
                                             persistent_workers=False)
        return self._model_batches(loader, on_device, device, nw)

    def _dali_threads(self, device: str) -> int:
        """DALI's reader and decoder threads: the loader_workers setting, else all cores but two."""
        if self.params.loader_workers:
            return self.params.loader_workers
        return max(2, min(16, (os.cpu_count() or 4) - 2)) if device == "cuda" else 2

    def _dali_batches(self, pipeline, shard: str, rows: list[int], captions: list[str], keys: list[str] | None,
                      device: str) -> Iterator[tuple[list[int], Any, list, Any]]:
        """Model batches through DALI (``models/dali_pipeline.py``): its reader streams the tar, the
        rows to embed whose image it can decode go to its decode pipeline in batches, prepared a
        batch ahead on a helper thread (on a CUDA stream of its own) while captions are tokenised
        on another. Every other row, and each batch DALI fails to decode, goes through
        ``_loader_batches``, which gives the standard result row by row."""
        import torch

        from curate.io.shards import _KEY_RE
        from curate.models.dali_pipeline import decodable

        want, size = set(rows), self.params.batch_size
        # larger images go to the loader path, which decodes them at reduced size
        max_pixels = min(self.params.max_pixels, _ShardImages.RAW_JPEG_MAX_PIXELS)
        slow: list[int] = []
        tokens = _RowTokens(self._clip.tokenizer, rows, captions, size)

        def decoded(batch_rows: list[int], encoded: list, stream) -> tuple[list[int], Any, list, Any] | None:
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

        def produce(stream=None):
            batch_rows: list[int] = []
            encoded: list = []
            seen = -1  # rows up to here are accounted for
            try:
                for row, name, data in pipeline.members(shard, want.__contains__):
                    match = _KEY_RE.match(name) if name else None
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
            yield from self._loader_batches(shard, sorted(slow), captions, device, loader_workers=0)

    def _model_batches(self, loader, on_device, device: str, loader_workers: int
                       ) -> Iterator[tuple[list[int], Any, list, Any]]:
        """(rows, images, failures, tokens) per loader batch. A helper thread prepares the next
        batch while the model runs this one: with device decoding (on its own CUDA stream), and
        when there are no loader processes (a daemonic Dask worker cannot start them; PIL and
        torch release the GIL while they decode and compute, so the two overlap)."""
        import torch

        def prepare(stream=None):
            for batch in loader:
                failures = list(batch["failures"])
                if stream is None:
                    imgs = self._batch_images(batch, on_device, device, failures)
                else:
                    with torch.cuda.stream(stream):
                        imgs = self._batch_images(batch, on_device, device, failures)
                    stream.synchronize()  # the images are complete before the model stream reads them
                yield batch["rows"], imgs, failures, batch["tokens"]

        if on_device is None or device != "cuda":
            yield from (prepare() if loader_workers else in_background(prepare(), depth=2, name="clip-decode"))
            return
        for rows, imgs, failures, tokens in in_background(prepare(torch.cuda.Stream()), depth=2, name="clip-decode"):
            if imgs is not None and imgs.is_cuda:
                imgs.record_stream(torch.cuda.current_stream())  # freed memory waits for the model's use
            yield rows, imgs, failures, tokens

    @staticmethod
    def _batch_images(batch: dict[str, Any], on_device, device: str, failures: list):
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

    def process(self, ctx: ShardContext) -> StageOutput:
        captions = ctx.column("caption")
        rows = ctx.rows()
        masks = None
        if self.params.mask_text_from:
            boxes = ctx.column("text_boxes", stage_id=self.params.mask_text_from)
            masks = {i: boxes[i] for i in rows if boxes[i]}
        # the tar's path where no fused task has read it already: DALI's reader can take a path
        shard = ctx.shard_path if ctx.shared is None else ctx.reader()
        res, failed = self.embed(shard, rows, captions, ctx.run.device, ctx.run.model_cache, masks,
                                 keys=ctx.column("key"))
        # a row without a result failed to decode, or the tar no longer holds it
        reasons = [None if i in res else failed.get(i, "clip:missing_image") for i in rows]
        got = [res.get(i, (None, None, None)) for i in rows]
        out = ctx.scatter({"clip_score": [g[0] for g in got], "image_emb": [g[1] for g in got],
                           "text_emb": [g[2] for g in got]}, rows, reasons)
        if self.params.store_embeddings:
            d = self._info["embed_dim"]
            out.columns["image_emb"] = fixed_list(out.columns["image_emb"], d)
            out.columns["text_emb"] = fixed_list(out.columns["text_emb"], d)
        else:
            del out.columns["image_emb"], out.columns["text_emb"]
        return out


def _image_size(preprocess) -> int:
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, (tuple, list)) and size:
            return int(size[0])
        if isinstance(size, int):
            return size
    return 224


@register_stage
class ClipRankStage(GlobalStage):
    """One global threshold over the pool's CLIP scores (DataComp's CLIP-score top 30 %)."""

    name = "clip_rank"
    columns = {
        "clip_rank_threshold": "the pool-wide CLIP-score threshold this run applied",
    }
    version = "1"

    class Params(Strict):
        scores_from: str = Field("clip_score", description="id of the stage whose scores are ranked (a clip_score "
                                 "stage; or index, for the scores a metadata pool carries)")
        score_column: str = Field("clip_score", description="the column of that stage to rank, e.g. "
                                  "clip_l14_similarity_score of a DataComp metadata pool")
        datacomp_parity: bool = Field(False, description="top_fraction as DataComp computes it: the threshold is "
                                      "the score at index floor(n * f) of the scores sorted descending, "
                                      "ties kept (default: exactly ceil(n * f) kept, ties broken by uid)")
        top_fraction: float | None = Field(None, gt=0, le=1, description="keep this share of the pool")
        min_score: float | None = Field(None, ge=-1, le=1, description="or keep scores >= this "
                                        "(tied to one scorer: prefer calibrate)")
        calibrate: Calibration | None = Field(None, description="or keep scores >= a threshold chosen "
                                              "on held-out pairs scored by this run's CLIP stage")
        exact_max_rows: int = Field(200_000_000, ge=1, description="beyond: histogram threshold")
        hist_bins: int = Field(65536, ge=16, description="bins over [-1, 1]: the histogram threshold, and the "
                               "exact one's first pass (its second pass holds one bin's rows)")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @model_validator(mode="after")
        def _one_rule(self):
            require_exactly_one(self, "top_fraction", "min_score", "calibrate")
            return self

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("clip_rank_threshold", pa.float32())]

    def reads(self) -> tuple[str, ...]:
        return (self.params.scores_from,)

    def format_summary(self, s: dict[str, Any]) -> list[str]:
        lines = [f"{self.stage_id}: threshold {s.get('threshold')} over {s.get('n')} scores of "
                 f"{self.params.scores_from} ({'exact' if s.get('exact') else 'approximate'}, rule {s.get('rule')})"]
        cal = s.get("calibration")
        if cal:
            lines.append(f"  calibrated ({cal['rule']}) on {cal['heldout_pairs']} held-out pairs: keeps "
                         f"{cal['heldout_recall']:.1%} of matched and {cal['heldout_false_accept']:.1%} of "
                         f"shuffled pairs (precision {cal['heldout_precision']}); median score matched "
                         f"{cal['matched_median']}, shuffled {cal['shuffled_median']}")
        return lines

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        cal = self.params.calibrate
        if cal is None:
            return {}
        try:
            shards = expand_input(cal.heldout)
        except Exception:  # reported by preflight and by combine
            shards = []
        return {"heldout": [(p, storage.size(p)) for p in shards]}

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string()), pa.field("clip_score", pa.float64())]

    def preflight(self, model_cache: str | None = None) -> list[str]:
        cal = self.params.calibrate
        if cal is None:
            return []
        try:
            found = len(heldout_captions(expand_input(cal.heldout), 20))
        except Exception as e:  # a missing or unreadable held-out set, named
            return [f"{self.stage_id}: calibrate.heldout: {e}"]
        return [] if found >= 20 else [f"{self.stage_id}: calibrate.heldout {cal.heldout!r} holds {found} "
                                       "usable pair(s); calibration needs at least 20"]

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        uids = ctx.column("uid")
        scores = ctx.column(self.params.score_column, stage_id=self.params.scores_from)
        ev = ctx.evaluate
        keep = [i for i in range(len(uids)) if ev[i] and scores[i] is not None]
        return {"uid": [uids[i] for i in keep], "clip_score": [scores[i] for i in keep]}

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        p = self.params
        edges = np.linspace(-1.0, 1.0, p.hist_bins + 1)
        hist = np.zeros(p.hist_bins, dtype=np.int64)
        n = 0
        for path in ctx.partials():  # pass 1: streaming, bounded memory
            s = read_table(path, columns=["clip_score"]).column(0).to_numpy().astype(np.float64)
            hist += np.histogram(np.clip(s, -1, 1), bins=edges)[0]
            n += len(s)
        art: dict[str, Any] = {"n": n, "rule": "min_score" if p.min_score is not None else
                               "calibrated" if p.calibrate else "top_fraction"}
        if p.min_score is not None:
            art.update(threshold=float(np.float32(p.min_score)), tie_uid=None, k=None, exact=True)
        elif p.calibrate is not None:
            scorer = ctx.pipeline_stage(self.params.scores_from)
            matched, shuffled = heldout_scores(scorer, p.calibrate, ctx.run.device, ctx.run.model_cache)
            cal = choose_threshold(matched, shuffled, p.calibrate)
            art.update(threshold=cal["threshold"], tie_uid=None, k=None, exact=True, calibration=cal)
            log.info("clip_rank calibrated on %d held-out pairs: %s", cal["heldout_pairs"], cal)
        elif n == 0:
            art.update(threshold=None, tie_uid=None, k=0, exact=True)
        elif p.datacomp_parity:
            s = np.sort(np.concatenate([read_table(x, columns=["clip_score"]).column(0).to_numpy()
                                        for x in ctx.partials()]))[::-1]
            art.update(threshold=float(s[min(n - 1, math.floor(n * p.top_fraction))]), tie_uid=None,
                       k=None, exact=True, rule="datacomp_top_fraction")
        else:
            k = max(1, math.ceil(p.top_fraction * n))
            art["k"] = k
            if n <= p.exact_max_rows:
                threshold, tie_uid = kth_ranked(ctx.partials(), k, p.hist_bins)
                art.update(threshold=threshold, tie_uid=tie_uid, exact=True)
            else:
                # Approximate: the lower edge of the bin holding the k-th score. Scores kept differ
                # from the exact top-k only inside that one bin: error <= 2 / hist_bins in score,
                # and <= that bin's count in samples (both recorded).
                cum = np.cumsum(hist[::-1])
                b = p.hist_bins - 1 - int(np.searchsorted(cum, k))
                art.update(threshold=float(edges[b]), tie_uid=None, exact=False,
                           score_error_bound=2.0 / p.hist_bins, count_error_bound=int(hist[b]))
        work = ctx.work
        ctx.write_json(ctx.stage_id, art)
        coarse = hist.reshape(-1, p.hist_bins // 256).sum(1) if p.hist_bins % 256 == 0 else hist
        cedges = np.linspace(-1.0, 1.0, len(coarse) + 1)
        write_table(pa.table({"bin_lo": cedges[:-1], "bin_hi": cedges[1:], "count": coarse}),
                    work.global_artifact(f"{ctx.stage_id}_histogram"))
        return art

    def apply(self, ctx: ShardContext) -> StageOutput:
        art = json.loads(ctx.work.global_artifact(ctx.stage_id, ".json").read_text())
        thr, tie = art["threshold"], art["tie_uid"]
        uids = ctx.column("uid")
        scores = ctx.column(self.params.score_column, stage_id=self.params.scores_from)
        ev = ctx.evaluate
        reasons = [None if not e else "clip:no_score" if s is None else
                   None if ranks_in(s, u, thr, tie) else "clip:below_threshold"
                   for u, s, e in zip(uids, scores, ev)]
        return StageOutput({"clip_rank_threshold": [thr] * len(uids)}, reasons)


def _score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each score over [-1, 1] (outside values in the end bins; NaN in bin -1, ranked last)."""
    b = np.floor((np.clip(scores, -1.0, 1.0) + 1.0) * (bins / 2.0))
    return np.where(np.isnan(scores), -1, np.minimum(b, bins - 1)).astype(np.int64)


def kth_ranked(partials: list, k: int, bins: int) -> tuple[float, str]:
    """(score, uid) of the k-th pair (1-based) in the order score descending, uid ascending, over
    Parquet files with ``uid`` and ``clip_score``: exact, in two streaming passes. Pass 1 counts
    scores per bin; pass 2 keeps only the rows of the bin that holds the k-th and sorts them. Equal
    scores share a bin, so the order of the rows in other bins does not matter; memory is one
    file's scores plus one bin's rows."""
    counts = np.zeros(bins + 1, dtype=np.int64)  # slot 0: NaN, then the bins
    for path in partials:
        s = read_table(path, columns=["clip_score"]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)
        counts += np.bincount(_score_bins(s, bins) + 1, minlength=bins + 1)
    from_top = np.cumsum(counts[::-1])  # rows in the bins from the top down to each
    slot = bins - int(np.searchsorted(from_top, k))  # the slot holding the k-th row
    above = int(from_top[bins - slot - 1]) if slot < bins else 0
    scores, uids = [], []
    for path in partials:
        t = read_table(path, columns=["uid", "clip_score"])
        s = t.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
        mine = np.flatnonzero(_score_bins(s, bins) + 1 == slot)
        if len(mine):
            scores.append(s[mine])
            uids.append(np.array(t.column("uid").take(mine).to_pylist()))
    s, u = np.concatenate(scores), np.concatenate(uids)
    last = np.lexsort((u, -s))[k - above - 1]  # NaN ranks last, as -NaN sorts last
    return float(s[last]), str(u[last])


def ranks_in(score: float, uid: str, threshold: float | None, tie_uid: str | None) -> bool:
    """The kept set: score above the threshold, or equal to it with a uid not after the tie uid."""
    if threshold is None:
        return False
    score = float(score)
    return score > threshold or (score == threshold and (tie_uid is None or uid <= tie_uid))
