"""Classifier filter: zero-shot classify each image over a class vocabulary with the pipeline's CLIP,
and drop a pair whose caption names none of the image's likely classes.

The image embeddings are the ones a clip_score stage stored (no second image forward); the class
embeddings are open_clip's zero-shot classifier (prompt templates averaged per class), computed once
per run with the same model's text tower and kept in WORK/cache. A pair is kept when the caption
names one of the top-k classes, a synonym or a hypernym of one (WordNet), or when the classifier
is unsure (top-1 probability below ``min_confidence``); otherwise ``classifier:caption_mismatch``.
"""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.algorithms.class_vocabulary import CaptionConfirmer, ClassVocabulary, VocabularyError, load_classes
from curate.core.config import ConfigError, Strict, fingerprint
from curate.io import storage
from curate.io.embeddings import embeddings
from curate.contract.base import MapStage, ShardContext, Stage, StageOutput, embedding_source
from curate.contract.registry import register_stage


def prompt_templates(choice: str | list[str]) -> list[str]:
    """open_clip's ImageNet prompt sets by name (``simple``: 7, ``openai``: 80) or the user's own."""
    if isinstance(choice, list):
        return choice
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    chosen = SIMPLE_IMAGENET_TEMPLATES if choice == "simple" else OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in chosen]


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities per row, largest first, ties to the lower class index."""
    k = min(k, probs.shape[1])
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k] if k < probs.shape[1] else np.tile(
        np.arange(probs.shape[1]), (len(probs), 1))
    vals = np.take_along_axis(probs, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists: the first writer wins, so every shard of a run
    uses the same class embeddings even when several workers computed them at once."""
    if storage.is_url(path):  # a conditional PUT: created whole, or not at all
        try:
            storage.exclusive_create(path, data)
        except FileExistsError:
            pass
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@register_stage
class ClassifierStage(MapStage):
    """Zero-shot image classes from stored CLIP embeddings; drops pairs whose caption names none of them."""

    name = "classifier"
    version = "1"
    columns = {
        "cls_labels": "the image's top-k zero-shot classes, most probable first",
        "cls_probs": "their probabilities (softmax over the whole vocabulary)",
        "cls_match": "the caption phrase that names one of the top-k classes, a synonym or a hypernym",
        "cls_decision": "match, unsure (top-1 probability below min_confidence: kept), mismatch, or no_embedding",
    }

    class Params(Strict):
        embeddings_from: str = Field("clip_score", description="id of the clip_score stage whose image "
                                     "embeddings (and model, for the class prompts) are used")
        vocabulary: str = Field("imagenet1k", description="imagenet1k, imagenet21k, or a file: one class a "
                                "line, 'name, synonym, ...' or a WordNet wnid")
        templates: Literal["simple", "openai"] | list[str] = Field(
            "simple", description="prompt templates: open_clip's simple (7) or openai (80) ImageNet sets, "
                                  "or a list of strings with {}")
        top_k: int = Field(5, ge=1, le=100, description="classes a caption may name")
        min_confidence: float = Field(0.5, ge=0, le=1, description="below this top-1 probability the "
                                      "classifier is unsure and the pair is kept")
        hypernym_levels: int = Field(6, ge=0, le=20, description="WordNet hypernym steps a caption may "
                                     "climb (golden retriever -> retriever -> ... -> dog)")
        min_hypernym_depth: int = Field(6, ge=0, le=20, description="hypernyms more general than this "
                                        "WordNet depth do not count (artifact 4, organism 5, animal 6)")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

        @field_validator("templates")
        @classmethod
        def _has_slot(cls, v):
            if isinstance(v, list) and (not v or any("{}" not in t for t in v)):
                raise ValueError("each template needs a {} for the class name")
            return v

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._weights: tuple[np.ndarray, float] | None = None
        self._confirmer: CaptionConfirmer | None = None
        self._info: dict[str, Any] = {}

    def reads(self) -> tuple[str, ...]:
        return (self.params.embeddings_from,)

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("cls_labels", pa.list_(pa.string())), pa.field("cls_probs", pa.list_(pa.float32())),
                pa.field("cls_match", pa.string()), pa.field("cls_decision", pa.string())]

    def resources(self, device: str = "cpu") -> dict[str, float] | None:
        return {"GPU": 1} if device == "cuda" else None  # the class prompts go through the text tower once

    def with_earlier(self, earlier: list[Stage]) -> "ClassifierStage":
        from curate.stages.clip_score import ClipScoreStage

        src = embedding_source(self.stage_id, earlier, self.params.embeddings_from)
        if src is not None and not isinstance(src, ClipScoreStage):
            raise ConfigError(f"stage {self.stage_id!r} prompts the classes with the text tower of "
                              f"{src.stage_id!r}'s model, and {src.name} loads none: read the embeddings of a "
                              "clip_score stage")
        return self

    def vocabulary(self) -> "ClassVocabulary":
        return load_classes(self.params.vocabulary)

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        try:
            return {"vocabulary_sha256": self.vocabulary().sha256}
        except VocabularyError:  # reported by preflight
            return {}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        try:
            self.vocabulary()
        except VocabularyError as e:
            return [f"{self.stage_id}: {e}"]
        return []

    def describe(self) -> dict[str, Any]:
        return dict(self._info)

    def confirmer(self) -> CaptionConfirmer:
        if self._confirmer is None:
            p = self.params
            self._confirmer = CaptionConfirmer(self.vocabulary(), p.hypernym_levels, p.min_hypernym_depth)
        return self._confirmer

    def class_weights(self, ctx: ShardContext) -> tuple[np.ndarray, float]:
        """(classes x dim unit class embeddings, logit scale), from the run's cache when there."""
        if self._weights is not None:
            return self._weights
        scorer = ctx.pipeline_stage(self.params.embeddings_from)
        vocab = self.vocabulary()
        templates = prompt_templates(self.params.templates)
        key = fingerprint({"scorer": scorer.describe(), "vocabulary": vocab.sha256, "templates": templates,
                           "checkpoint": scorer.fingerprint_extra(ctx.run.model_cache)})
        path = ctx.cache_file(f"classes-{key}.npz")
        if path is None or not path.exists():
            w, scale = self._compute_weights(scorer, vocab.names, templates, ctx)
            buf = io.BytesIO()
            np.savez(buf, weights=w, logit_scale=np.float32(scale))
            if path is None:
                self._weights = (w, scale)
            else:
                _write_once(path, buf.getvalue())
        if self._weights is None:
            with np.load(io.BytesIO(path.read_bytes())) as z:
                self._weights = (z["weights"], float(z["logit_scale"]))
        self._info = {"scorer": scorer.describe(), "vocabulary": self.params.vocabulary,
                      "vocabulary_sha256": vocab.sha256, "classes": len(vocab.names),
                      "templates": len(templates), "logit_scale": self._weights[1]}
        return self._weights

    @staticmethod
    def _compute_weights(scorer, names, templates, ctx: ShardContext) -> tuple[np.ndarray, float]:
        import torch
        from open_clip import build_zero_shot_classifier

        clip = scorer.clip(ctx.run.device, ctx.run.model_cache)
        with torch.no_grad():
            w = build_zero_shot_classifier(clip.model, clip.tokenizer, list(names), templates,
                                           num_classes_per_batch=max(1, 2048 // len(templates)),
                                           device=ctx.run.device)
            scale = float(clip.model.logit_scale.exp().float().cpu())
        return w.T.float().cpu().numpy().astype(np.float32), scale

    def process(self, ctx: ShardContext) -> StageOutput:
        p = self.params
        rows = ctx.rows()
        emb = embeddings(ctx.read(p.embeddings_from, ["image_emb"]), "image_emb")[rows]
        captions = ctx.column("caption", rows)
        weights, scale = self.class_weights(ctx)
        if emb.shape[1] != weights.shape[1]:
            raise RuntimeError(f"{p.embeddings_from}'s image embeddings have {emb.shape[1]} dimensions but "
                               f"its model's class embeddings {weights.shape[1]}: the stage table does not "
                               "come from this model")
        norms = np.linalg.norm(emb, axis=1)
        ok = np.isfinite(emb).all(axis=1) & (norms > 0)
        probs = softmax(scale * (emb[ok] / norms[ok, None]) @ weights.T)
        best = top_k(probs, p.top_k)
        names = self.vocabulary().names
        confirm = self.confirmer()
        labels: list = [None] * len(rows)
        plist: list = [None] * len(rows)
        match: list = [None] * len(rows)
        decision: list = ["no_embedding"] * len(rows)
        reasons: list = ["classifier:no_embedding"] * len(rows)
        for j, i in enumerate(np.flatnonzero(ok)):
            top = best[j].tolist()
            labels[i] = [names[c] for c in top]
            plist[i] = probs[j, top].astype(np.float32).tolist()
            match[i] = confirm.confirmed_by(captions[i], top)
            if match[i] is not None:
                decision[i], reasons[i] = "match", None
            elif plist[i][0] < p.min_confidence:
                decision[i], reasons[i] = "unsure", None
            else:
                decision[i], reasons[i] = "mismatch", "classifier:caption_mismatch"
        ctx.count("unsure", decision.count("unsure"))
        return ctx.scatter({"cls_labels": labels, "cls_probs": plist, "cls_match": match,
                            "cls_decision": decision}, rows, reasons)
