"""Embeddings that come with a metadata pool: DataComp ships one ``.npz`` beside each metadata
Parquet (same name) with OpenAI ViT-B/32 and ViT-L/14 image and caption embeddings (``b32_img``,
``b32_txt``, ``l14_img``, ``l14_txt``; one row per Parquet row, in order). This stage writes one
model's pair as ``image_emb`` / ``text_emb``, the columns a clip_score stage stores, so dedup,
the reference filter, clip_loss and embedding heads run on the pool without an image or a model.
"""
from __future__ import annotations

import io
import posixpath
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io import storage
from curate.io.embeddings import fixed_list
from curate.contract.base import MapStage, ShardContext, StageOutput
from curate.contract.registry import register_stage

PREFIX = {"ViT-L-14": "l14", "ViT-B-32": "b32"}  # DataComp's array names per model


def sidecar(shard_path: str) -> str:
    """The .npz beside a metadata Parquet shard."""
    root, ext = posixpath.splitext(shard_path)
    return root + ".npz"


@register_stage
class MetadataEmbeddingsStage(MapStage):
    """A metadata pool's own CLIP embeddings (DataComp's .npz beside each Parquet) as image_emb/text_emb."""

    name = "metadata_embeddings"
    filters = False
    version = "1"
    columns = {"image_emb": "the pool's image embedding for this row (float16, L2-normalised)",
               "text_emb": "the pool's caption embedding for this row (float16, L2-normalised)"}

    class Params(Strict):
        model: Literal["ViT-L-14", "ViT-B-32"] = Field("ViT-L-14", description="which of DataComp's embeddings "
                                                       "(OpenAI weights): l14_* or b32_* arrays of the .npz")

    def value_fields(self) -> list[pa.Field]:
        from curate.models.clip import embed_dim

        d = embed_dim(self.params.model)
        return [pa.field("image_emb", pa.list_(pa.float16(), d)), pa.field("text_emb", pa.list_(pa.float16(), d))]

    def provides_embeddings(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        # DataComp computed these with OpenAI's weights: a reference or target set embedded with
        # ViT-L-14 / openai matches them
        return {"model": self.params.model, "pretrained": "openai", "checkpoint_sha256": None,
                "source": f"{PREFIX[self.params.model]}_img / {PREFIX[self.params.model]}_txt of the pool's .npz"}

    def process(self, ctx: ShardContext) -> StageOutput:
        path = sidecar(ctx.shard_path)
        pre = PREFIX[self.params.model]
        if not ctx.shard_path.endswith(".parquet"):
            raise ValueError(f"{ctx.shard}: metadata_embeddings needs a metadata pool (Parquet shards with "
                             ".npz beside them), not {posixpath.basename(ctx.shard_path)}")
        try:
            with storage.open_read(path) as f:
                arrays = np.load(io.BytesIO(f.read()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no {posixpath.basename(path)} beside {posixpath.basename(ctx.shard_path)}") from None
        missing = [k for k in (f"{pre}_img", f"{pre}_txt") if k not in arrays.files]
        if missing:
            raise ValueError(f"{posixpath.basename(path)} has no array {missing[0]!r}: it holds {sorted(arrays.files)}")
        img, txt = arrays[f"{pre}_img"], arrays[f"{pre}_txt"]
        n = ctx.n_rows
        d = self.value_fields()[0].type.list_size
        for name, a in ((f"{pre}_img", img), (f"{pre}_txt", txt)):
            if a.shape != (n, d):
                raise ValueError(f"{posixpath.basename(path)}: {name} has shape {a.shape}, the shard has {n} rows "
                                 f"of {d}-d {self.params.model} embeddings")
        out = ctx.scatter({"image_emb": [img[i] for i in ctx.rows()], "text_emb": [txt[i] for i in ctx.rows()]},
                          ctx.rows())
        out.columns = {k: fixed_list(v, d) for k, v in out.columns.items()}
        return out
