"""clip_score: batched open_clip inference per shard (map).

It writes the cosine similarity of L2-normalised image and text embeddings (as DataComp) and both
embeddings as float16 fixed-size lists, row order tied to uid, because dedup, the reference-set
filter, clip_loss and the classifier reuse them. The data path (the CPU loader, the device decoders,
DALI) is ``models/clip_batches.py``, the forward ``models/clip_forward.py``; ``clip_rank``
(``stages/clip_rank.py``) thresholds the scores.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io.embeddings import fixed_list
from curate.models.clip_batches import (ClipBatches, DataPathSettings, Shard, device_preprocess, embed_batches,
                                        model_input_size)
from curate.models.clip_forward import ClipForward
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
        self._batches: ClipBatches | None = None
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
            settings = self.data_path_settings()
            on_device = device_preprocess(clip, device, settings) is not None
            decoder = "DALI" if self.params.device_decoder == "dali" else "nvJPEG"
            self._forward_fn = ClipForward(clip, device, precision=self.params.precision,
                                           compile=self.params.compile, batch_size=self.params.batch_size,
                                           text_cache=self.params.text_cache,
                                           batch_invariant=self.params.batch_invariant)
            self._info = dict(clip.info, image_size=model_input_size(clip),
                              decode=f"device ({decoder} for JPEG)" if on_device else "PIL on the CPU",
                              compiled=self.params.compile, text_prefix=self._forward_fn.trims_text,
                              batch_invariant=self.params.batch_invariant)
            self._batches = ClipBatches(clip, settings)
            self._clip = clip
        return self._clip

    def data_path_settings(self) -> DataPathSettings:
        p = self.params
        return DataPathSettings(batch_size=p.batch_size, loader_workers=p.loader_workers, max_pixels=p.max_pixels,
                                jpeg_draft=p.jpeg_draft, decode_timeout_s=p.decode_timeout_s,
                                device_decode=p.device_decode, device_decoder=p.device_decoder)

    def describe(self) -> dict[str, Any]:
        return dict(self._info) if self._clip else {"model": self.params.model,
                                                    "pretrained": self.params.pretrained}

    @property
    def forward(self) -> ClipForward:
        """The forward pass of the loaded model (``clip()`` loads it)."""
        if self._forward_fn is None:
            raise RuntimeError("clip_score: clip() loads the model before its forward is used")
        return self._forward_fn

    @property
    def batches(self) -> ClipBatches:
        """The data path of the loaded model (``clip()`` loads it): ``batches(shard, rows, captions,
        device, masks, keys)`` yields (rows, images, failures, tokens) per batch."""
        if self._batches is None:
            raise RuntimeError("clip_score: clip() loads the model before its data path is used")
        return self._batches

    def embed(self, shard: Shard, rows: list[int], captions: list[str], device: str, model_cache: str | None,
              masks: dict[int, list] | None = None, keys: list[str] | None = None,
              on_batch: Callable[[int], None] | None = None
              ) -> tuple[dict[int, tuple[float, Any, Any]], dict[int, str]]:
        """{row: (score, image_emb, text_emb)} and {row: reason} for images that failed to decode;
        ``shard`` is a tar path or a ``ShardContext.reader()``; ``masks``: text boxes per row to fill
        before scoring; ``keys``: the index's sample keys (checked where DALI reads the tar)."""
        self.clip(device, model_cache)
        return embed_batches(self.forward, self.batches(shard, rows, captions, device, masks, keys),
                             self.params.batch_size, on_batch)

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
