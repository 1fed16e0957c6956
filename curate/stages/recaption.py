"""A caption written by a model for each image (``models/captioner.py``): open_clip's CoCa models
or a Hugging Face image-to-text / vision-language model, deterministic (greedy or beam search), on
the CPU or one GPU per worker. The caption is stored beside the alt-text (``caption_synthetic``);
``curate export --caption synthetic|both`` writes it into the shards.

Which rows: the survivors of the earlier filters (default), every row (``all_rows``), or the rows
that one earlier filter alone dropped (``dropped_by: clip_rank``: pairs whose image passed every
other filter but whose alt-text scored low, the candidates for a rescue).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.contract.base import MapStage, ShardContext, StageOutput
from curate.contract.registry import register_stage
from curate.core.config import Strict
from curate.core.timeouts import TimeLimiter
from curate.io.images import decode_within

log = logging.getLogger(__name__)


@register_stage
class RecaptionStage(MapStage):
    """A model-written caption per image (CoCa through open_clip, or a transformers captioner)."""

    name = "recaption"
    version = "1"
    filters = False
    columns = {"caption_synthetic": "a caption written by the stage's model for the image (null for rows the "
                                    "stage did not caption or whose image could not be decoded)"}

    class Params(Strict):
        backend: Literal["open_clip", "transformers"] = Field("open_clip", description="open_clip: a CoCa model; "
                                                              "transformers: a local HF image-to-text model")
        model: str = Field("coca_ViT-L-14", description="open_clip model name, or the transformers model's local "
                                                        "directory / HF cache name")
        pretrained: str | None = Field("mscoco_finetuned_laion2b_s13b_b90k", description="open_clip: a tag or a "
                                       "local checkpoint (null: random weights, tests); transformers: unused")
        prompt: str | None = Field(None, description="transformers: text the model continues (e.g. 'a photo of')")
        max_new_tokens: int = Field(20, ge=1, le=256, description="longest caption, in tokens")
        num_beams: int = Field(1, ge=1, le=16, description="1: greedy decoding; more: beam search")
        dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="transformers: weights' type "
                                                       "(bf16 on a GPU that has it)")
        batch_size: int = Field(32, ge=1, description="images per generate call")
        decode_side: int = Field(512, ge=32, le=4096, description="images are decoded at most this many pixels on "
                                 "their longer side (the model's own preprocessing resizes them after)")
        dropped_by: str | None = Field(None, description="caption only the rows this earlier filter alone dropped "
                                       "(e.g. clip_rank); null: the survivors")
        max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb cap (header w*h)")
        decode_timeout_s: float | None = Field(30.0, gt=0, description="per-image decode limit; null: none")
        all_rows: bool = Field(False, description="caption every row, not only the survivors")

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._limiter = TimeLimiter(self.params.decode_timeout_s, name=f"{self.stage_id}-decode")
        self._captioner: Any = None

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("caption_synthetic", pa.string())]

    def needs_pixels(self) -> bool:
        return True

    def resources(self, device: str = "cpu") -> dict[str, float] | None:
        return {"GPU": 1} if device == "cuda" else None

    def with_earlier(self, earlier: list) -> "RecaptionStage":
        from curate.core.config import ConfigError

        by = self.params.dropped_by
        if by is not None and not any(s.stage_id == by and s.filters for s in earlier):
            filters = [s.stage_id for s in earlier if s.filters]
            raise ConfigError(f"stage {self.stage_id!r}: dropped_by names {by!r}, which is not an earlier filter "
                              f"stage of the pipeline (earlier filters: {', '.join(filters) or 'none'})")
        return self

    def fingerprint_params(self) -> dict[str, Any]:
        # the batch and the time limit decide how fast, not what is written (greedy and beam search
        # decode each image alone)
        return self.params.model_dump(mode="json", exclude={"batch_size", "decode_timeout_s"})

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        from curate.models.clip import file_sha256, resolve_checkpoint

        if self.params.backend == "transformers":
            return {"model": self.params.model}
        ckpt = resolve_checkpoint(self.params.pretrained, model_cache)
        return {"checkpoint_sha256": file_sha256(ckpt) if ckpt else None}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        """The model is found offline and can caption, checked without loading its weights."""
        p = self.params
        if p.backend == "transformers":
            try:
                from transformers import AutoConfig

                AutoConfig.from_pretrained(p.model, local_files_only=True)
            except ImportError:
                return [f"{self.stage_id}: transformers is missing: pip install 'curate[caption]'"]
            except (OSError, ValueError) as e:
                return [f"{self.stage_id}: model {p.model!r} not found offline (a local directory or a model in "
                        f"the HF cache): {str(e).splitlines()[0]}"]
            return []
        import open_clip
        from open_clip import coca_model

        from curate.models.clip_registry import register_configs
        from curate.models.weights import weights_problem

        problem = weights_problem(p.model, p.pretrained, model_cache)
        if problem:
            return [f"{self.stage_id}: {problem}"]
        register_configs()
        if "multimodal_cfg" not in (open_clip.get_model_config(p.model) or {}):
            coca = [m for m in open_clip.list_models() if "coca" in m.lower()]
            return [f"{self.stage_id}: {p.model} is not a captioning model (open_clip's are {', '.join(coca)})"]
        if not coca_model._has_transformers:
            return [f"{self.stage_id}: open_clip's CoCa generate needs transformers < 4.57: pip install "
                    "'curate[caption]' (make install installs it)"]
        return []

    def captioner(self, device: str, model_cache: str | None):
        from curate.models.captioner import open_clip_captioner, transformers_captioner

        if self._captioner is None:
            p = self.params
            if p.backend == "open_clip":
                self._captioner = open_clip_captioner(p.model, p.pretrained, device=device, model_cache=model_cache,
                                                      max_new_tokens=p.max_new_tokens, num_beams=p.num_beams)
            else:
                self._captioner = transformers_captioner(p.model, device=device, prompt=p.prompt,
                                                         max_new_tokens=p.max_new_tokens, num_beams=p.num_beams,
                                                         dtype=p.dtype)
        return self._captioner

    def describe(self) -> dict[str, Any]:
        return dict(self._captioner.info) if self._captioner is not None else {}

    def _rows(self, ctx: ShardContext) -> list[int]:
        by = self.params.dropped_by
        if by is None:
            return ctx.rows()
        keep = np.ones(ctx.n_rows, dtype=bool)
        for sid in ctx.upstream:
            col = ctx.read(sid, [f"keep_{sid}"]).column(0).to_numpy(zero_copy_only=False)
            col = np.array([v is True for v in col]) if col.dtype == object else col.astype(bool)
            keep &= ~col if sid == by else col
        return np.flatnonzero(keep).tolist()

    def process(self, ctx: ShardContext) -> StageOutput:
        from PIL import Image

        p = self.params
        captioner = self.captioner(ctx.run.device, ctx.run.model_cache)
        rows = self._rows(ctx)
        got: dict[int, str] = {}
        batch: list[tuple[int, Any]] = []

        def flush() -> None:
            texts = captioner.caption([im for _, im in batch])
            got.update({i: t for (i, _), t in zip(batch, texts)})
            ctx.count("captions_written", len(batch))
            batch.clear()

        for i, s in ctx.samples_at(rows):
            rgb, _, reason = decode_within(self._limiter, s.image(), s.image_ext(), p.decode_side, p.max_pixels,
                                           "recaption")
            if rgb is None:
                ctx.count(reason or "recaption:undecodable")
                continue
            batch.append((i, Image.fromarray(rgb)))
            if len(batch) >= p.batch_size:
                flush()
        if batch:
            flush()
        return ctx.scatter({"caption_synthetic": [got.get(i) for i in rows]}, rows)
