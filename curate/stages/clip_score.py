"""clip_score: batched open_clip inference per shard (map).

It writes the cosine similarity of L2-normalised image and text embeddings (as DataComp) and both
embeddings as float16 fixed-size lists, row order tied to uid, because dedup, the reference-set
filter, clip_loss and the classifier reuse them. The CPU loader is ``models/clip_loader.py``, the
device decoders ``models/device_preprocess.py`` (nvJPEG) and ``models/dali_*.py``, the forward
``models/clip_forward.py``; ``clip_rank`` (``stages/clip_rank.py``) thresholds the scores.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
from typing import Any, Callable, Iterator

import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.core.background import in_background
from curate.io.embeddings import fixed_list
from curate.io.tar_members import is_local_plain_tar
from curate.models.clip_forward import ClipForward
from curate.models.clip_loader import RowTokens, ShardImages, collate, image_size, shard_images_dataset
from curate.contract.base import MapStage, ShardContext, StageOutput
from curate.contract.registry import register_stage

log = logging.getLogger(__name__)


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
        batch_invariant: bool = Field(True, description="one shape for every forward (batches padded to batch_size, "
                                      "the full text context): a sample's score is the same bits whatever shard or "
                                      "batch it lands in; false: the text cut after each batch's longest caption and "
                                      "no padding (faster; the last bits then depend on the batch-mates)")
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
        caption_from: str | None = Field(None, description="id of a recaption stage: score its synthetic caption "
                                         "instead of the alt-text (a row without one: clip:no_caption)")
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
        return tuple(s for s in (self.params.mask_text_from, self.params.caption_from) if s)

    def with_earlier(self, earlier: list) -> "ClipScoreStage":
        from curate.core.config import ConfigError

        src = next((s for s in earlier if s.stage_id == self.params.mask_text_from), None)
        if src is not None and "text_boxes" not in {f.name for f in src.value_fields()}:
            raise ConfigError(f"stage {self.stage_id!r} masks the text regions of {src.stage_id!r}, which finds "
                              "none: mask_text_from names a text_mask stage")
        cap = next((s for s in earlier if s.stage_id == self.params.caption_from), None)
        if cap is not None and "caption_synthetic" not in {f.name for f in cap.value_fields()}:
            raise ConfigError(f"stage {self.stage_id!r} scores the captions of {cap.stage_id!r}, which writes none: "
                              "caption_from names a recaption stage")
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
                                           text_cache=self.params.text_cache,
                                           batch_invariant=self.params.batch_invariant)
            self._info = dict(clip.info, image_size=clip.info.get("image_size") or image_size(clip.preprocess),
                              decode=f"device ({decoder} for JPEG)" if on_device else "PIL on the CPU",
                              compiled=self.params.compile, text_prefix=self._forward_fn.trims_text,
                              batch_invariant=self.params.batch_invariant)
            self._clip = clip
        return self._clip

    def describe(self) -> dict[str, Any]:
        return dict(self._info) if self._clip else {"model": self.params.model,
                                                    "pretrained": self.params.pretrained}

    @property
    def forward(self) -> ClipForward:
        """The forward pass of the loaded model (``clip()`` loads it)."""
        if self._forward_fn is None:
            raise RuntimeError("clip_score: clip() loads the model before its forward is used")
        return self._forward_fn

    def loader_processes(self, device: str) -> int:
        """DataLoader processes the loader path starts: the setting, else (on cuda) all cores but one
        up to 8; none on a daemonic process, which cannot start them."""
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
              keys: list[str] | None = None, on_batch: Callable[[int], None] | None = None
              ) -> tuple[dict[int, tuple[float, Any, Any]], dict[int, str]]:
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
        if isinstance(on_device, DaliPreprocess) and not masks and is_local_plain_tar(shard):
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
        ds = shard_images_dataset()(shard, rows, clip.preprocess, draft=2 * int(size) if self.params.jpeg_draft else 0,
                                max_pixels=self.params.max_pixels, timeout_s=self.params.decode_timeout_s,
                                captions={r: captions[r] for r in rows}, raw_jpeg=on_device is not None,
                                masks=masks)
        nw = self.loader_processes(device) if loader_workers is None else loader_workers
        loader = torch.utils.data.DataLoader(ds, batch_size=self.params.batch_size, num_workers=nw,
                                             collate_fn=functools.partial(collate, tokenizer=clip.tokenizer),
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

        from curate.io.shards import SAMPLE_KEY_RE
        from curate.models.dali_pipeline import decodable

        want, size = set(rows), self.params.batch_size
        # larger images go to the loader path, which decodes them at reduced size
        max_pixels = min(self.params.max_pixels, ShardImages.RAW_JPEG_MAX_PIXELS)
        slow: list[int] = []
        tokens = RowTokens(self._clip.tokenizer, rows, captions, size)

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
        rows = ctx.rows()
        if self.params.caption_from:
            captions = ctx.column("caption_synthetic", stage_id=self.params.caption_from)
            missing = {i for i in rows if captions[i] is None}
            rows = [i for i in rows if i not in missing]
        else:
            captions, missing = ctx.column("caption"), set()
        masks = None
        if self.params.mask_text_from:
            boxes = ctx.column("text_boxes", stage_id=self.params.mask_text_from)
            masks = {i: boxes[i] for i in rows if boxes[i]}
        # the tar's path where no fused task has read it already: DALI's reader can take a path
        shard = ctx.shard_path if ctx.shared is None else ctx.reader()
        tick = ctx.ticker(len(rows))
        res, failed = self.embed(shard, rows, captions, ctx.run.device, ctx.run.model_cache, masks,
                                 keys=ctx.column("key"), on_batch=tick.tick)
        tick.close()
        # a row without a result failed to decode, or the tar no longer holds it
        reasons = [None if i in res else failed.get(i, "clip:missing_image") for i in rows]
        if missing:  # rows the recaption stage wrote no caption for: judged, not skipped
            rows, reasons = map(list, zip(*sorted([*zip(rows, reasons), *((i, "clip:no_caption") for i in missing)])))
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
