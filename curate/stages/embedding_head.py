"""A small model on stored CLIP embeddings: LAION's aesthetic predictor, an NSFW head, any MLP
trained on CLIP embeddings, loaded from the user's checkpoint (no second image forward).

The checkpoint is a torch state dict (``torch.load(weights_only=True)``) of Linear layers in
order, as LAION's heads save them (``layers.0.weight``, ``layers.0.bias``, ``layers.2.weight``...:
the dropouts between them hold no weights). ``activation`` goes between layers (LAION's aesthetic
MLP has none), ``output`` after the last one. Rows are dropped below ``min_score`` or above
``max_score`` (``<stage id>:below_min`` / ``:above_max``), so two heads (aesthetics, NSFW) are two
stages with their own ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io.embeddings import embeddings
from curate.contract.base import MapStage, ShardContext, Stage, StageOutput, embedding_source
from curate.contract.registry import register_stage


class HeadError(ValueError):
    """The checkpoint is not a chain of Linear layers that fits the embeddings."""


def linear_chain(state: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(weight, bias) of each Linear layer of a state dict, in order, checked to chain."""
    layers = []
    for key, w in state.items():
        if key.endswith("weight") and getattr(w, "ndim", 0) == 2:
            b = state.get(key[:-len("weight")] + "bias")
            layers.append((w, b))
    if not layers:
        raise HeadError("no Linear layer weights (2-d '...weight' tensors) in the checkpoint")
    for (w1, _), (w2, _) in zip(layers, layers[1:]):
        if w2.shape[1] != w1.shape[0]:
            raise HeadError(f"layer shapes do not chain: {tuple(w1.shape)} then {tuple(w2.shape)}")
    return layers


def load_head(path: str, activation: str, output: str):
    """The checkpoint as a torch module (eval mode, float32) and its layer shapes."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HeadError(f"cannot read {path} as a torch state dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadError(f"{path} holds a {type(state).__name__}, not a state dict")
    mods: list = []
    layers = linear_chain(state)
    for k, (w, b) in enumerate(layers):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w.float())
            if b is not None:
                lin.bias.copy_(b.float())
        mods.append(lin)
        if k < len(layers) - 1 and activation != "none":
            mods.append(torch.nn.ReLU() if activation == "relu" else torch.nn.GELU())
    if output == "sigmoid":
        mods.append(torch.nn.Sigmoid())
    if layers[-1][0].shape[0] != 1:
        raise HeadError(f"the last layer has {layers[-1][0].shape[0]} outputs; a head gives one score")
    return torch.nn.Sequential(*mods).eval(), [tuple(w.shape) for w, _ in layers]


@register_stage
class EmbeddingHeadStage(MapStage):
    """A user's MLP head (LAION aesthetics, NSFW...) on stored CLIP embeddings; optional min/max score rules."""

    name = "embedding_head"
    version = "2"
    columns = {"head_score": "the head's output for the (L2-normalised) stored embedding"}

    class Params(Strict):
        checkpoint: str = Field(description="torch state dict of the head's Linear layers (e.g. LAION's "
                                "sac+logos+ava1-l14-linearMSE.pth for ViT-L/14 image embeddings)")
        embeddings_from: str = Field("clip_score", description="id of the clip_score stage whose embeddings feed the head")
        column: Literal["image_emb", "text_emb"] = Field("image_emb", description="which stored embedding")
        normalize: bool = Field(True, description="L2-normalise the embedding first (as LAION's heads expect)")
        activation: Literal["none", "relu", "gelu"] = Field("none", description="between layers (LAION aesthetic: none)")
        output: Literal["identity", "sigmoid"] = Field("identity", description="after the last layer")
        min_score: float | None = Field(None, description="drop rows scoring below (e.g. aesthetics 5.0)")
        max_score: float | None = Field(None, description="drop rows scoring above (e.g. an NSFW probability 0.5)")
        batch_size: int = Field(4096, ge=1, description="rows per forward (the last batch of a shard is padded to it)")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._head = None
        self._dim: int | None = None

    def reads(self) -> tuple[str, ...]:
        return (self.params.embeddings_from,)

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("head_score", pa.float32())]

    def with_earlier(self, earlier: list[Stage]) -> "EmbeddingHeadStage":
        src = embedding_source(self.stage_id, earlier, self.params.embeddings_from)
        if src is None or not hasattr(src.params, "model"):
            return self
        from curate.models.clip import ModelError, embed_dim

        try:
            self._dim = embed_dim(src.params.model)
        except ModelError:  # the scorer's own preflight names an unknown model
            pass
        return self

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        from curate.models.clip import file_sha256

        p = Path(self.params.checkpoint).expanduser()
        return {"checkpoint_sha256": file_sha256(str(p)) if p.is_file() else None}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        p = Path(self.params.checkpoint).expanduser()
        if not p.is_file():
            return [f"{self.stage_id}: checkpoint {self.params.checkpoint!r} not found"]
        try:
            _, shapes = load_head(str(p), self.params.activation, self.params.output)
        except HeadError as e:
            return [f"{self.stage_id}: {e}"]
        if self._dim is not None and shapes[0][1] != self._dim:
            return [f"{self.stage_id}: the head takes {shapes[0][1]}-d inputs, {self.params.embeddings_from}'s "
                    f"model gives {self._dim}-d embeddings"]
        return []

    def head(self):
        if self._head is None:
            self._head = load_head(str(Path(self.params.checkpoint).expanduser()), self.params.activation,
                                   self.params.output)
        return self._head

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.params.checkpoint, **self.fingerprint_extra(),
                "layers": self.head()[1] if self._head else None}

    def process(self, ctx: ShardContext) -> StageOutput:
        import torch

        p = self.params
        rows = ctx.rows()
        emb = embeddings(ctx.read(p.embeddings_from, [p.column]), p.column)[rows]
        head, shapes = self.head()
        if emb.shape[1] != shapes[0][1]:
            raise RuntimeError(f"{p.embeddings_from}.{p.column} has {emb.shape[1]} dimensions, the head takes {shapes[0][1]}")
        norms = np.linalg.norm(emb, axis=1)
        ok = np.flatnonzero(np.isfinite(emb).all(axis=1) & (norms > 0))
        x = emb[ok] / norms[ok, None] if p.normalize else emb[ok]
        out = np.empty(len(ok), dtype=np.float32)
        batch = np.zeros((p.batch_size, x.shape[1]), dtype=np.float32)
        with torch.inference_mode():
            for a in range(0, len(ok), p.batch_size):
                # every forward has one shape (the last batch padded with zeros), so a row's score
                # is the same bits whichever shard or batch it lands in
                n = min(p.batch_size, len(ok) - a)
                batch[:n] = x[a:a + n]
                batch[n:] = 0
                out[a:a + n] = head(torch.from_numpy(batch)).squeeze(1).numpy()[:n]
        scores: list = [None] * len(rows)
        reasons: list = [f"{self.stage_id}:no_embedding"] * len(rows)
        for j, v in zip(ok.tolist(), out.tolist()):
            scores[j] = v
            reasons[j] = (f"{self.stage_id}:below_min" if p.min_score is not None and v < p.min_score else
                          f"{self.stage_id}:above_max" if p.max_score is not None and v > p.max_score else None)
        return ctx.scatter({"head_score": scores}, rows, reasons)
