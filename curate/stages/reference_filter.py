"""Reference-set filtering (DataComp's image-based baseline), with any CLIP model.

combine: k-means (faiss; spherical, or plain as DataComp's) on a sample of the pool's stored CLIP image embeddings (or
centroids reused from an earlier run), then the nearest centroid of every reference embedding; the
set of those centroids is the artifact. apply (a map): each pool sample's nearest centroid and its
similarity; keep when the centroid is in the reference set.

The reference is a folder of images, WebDataset shards, or a ``.npy`` of embeddings with a
``.json`` sidecar naming the model that made them. Images are embedded by the CLIP stage's own
loading and preprocessing; a reference made with another model is refused.
"""
from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io.images import open_checked
from curate.io.parquet import atomic_write_bytes, num_rows, read_table
from curate.io.shards import expand_input, iter_samples
from curate.contract.base import GlobalContext, GlobalStage, ShardContext, StageOutput
from curate.contract.registry import register_stage
from curate.algorithms.sampling import sample_share, uid_sample
from curate.algorithms.vectors import nearest, train_centroids

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ReferenceError(ValueError):
    """The reference set cannot be used with this pool (wrong model, empty, unreadable)."""


def model_identity(describe: dict[str, Any]) -> dict[str, Any]:
    """What must match between pool and reference embeddings."""
    return {"model": describe.get("model"), "checkpoint_sha256": describe.get("checkpoint_sha256"),
            "pretrained": None if describe.get("checkpoint_sha256") else describe.get("pretrained")}


class Reference(NamedTuple):
    """L2-normalised embeddings, their labels (or None), and how many images could not be decoded."""

    emb: np.ndarray
    labels: list[str] | None
    skipped: int = 0


def decodable(images: list[bytes], max_pixels: int = 100_000_000) -> list[int]:
    """Positions of the images that decode (a truncated or corrupt file, a bomb, are left out)."""
    ok = []
    for i, data in enumerate(images):
        try:
            im, _ = open_checked(data, None, max_pixels)
            with im:
                im.convert("RGB").load()
        except Exception:  # any reason a reference image cannot be read: skipped and counted
            continue
        ok.append(i)
    return ok


def embed_images(images: list[bytes], describe: dict[str, Any], batch: int = 128) -> np.ndarray:
    """Reference images (each one decodable: see ``decodable``) through the same open_clip model
    and preprocessing as the pool."""
    import torch
    from PIL import Image

    from curate.models.clip import load_clip

    clip = load_clip(describe["model"], describe.get("checkpoint") or describe.get("pretrained"))
    out = []
    with torch.inference_mode():
        for k in range(0, len(images), batch):
            x = torch.stack([clip.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[k:k + batch]])
            out.append(torch.nn.functional.normalize(clip.model.encode_image(x).float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _folder_images(p: Path) -> tuple[list[bytes], list[str] | None]:
    """Images under a folder; in ImageNet's layout (one sub-folder per class) the sub-folder names
    are the labels."""
    files = [f for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTS]
    images = [f.read_bytes() for f in files]
    nested = files and all(f.parent != p for f in files)
    return images, [f.parent.relative_to(p).as_posix() for f in files] if nested else None


def _shard_images(source: str) -> tuple[list[bytes], list[str] | None]:
    """Images in WebDataset shards; a ``label`` (or ``class``) key in the json is the label."""
    images, labels = [], []
    for sh in expand_input(source):
        for s in iter_samples(sh):
            if s.image():
                meta = s.meta()
                images.append(s.image())
                labels.append(meta.get("label", meta.get("class")))
    return images, [str(x) for x in labels] if labels and all(x is not None for x in labels) else None


def load_reference(source: str, describe: dict[str, Any]) -> Reference:
    """L2-normalised reference embeddings, made with (or checked against) the pool's model, and
    their labels where the reference has them; images that do not decode are skipped and counted."""
    p = Path(source)
    want = model_identity(describe)
    labels: list[str] | None
    if p.suffix == ".npy":
        side = p.with_suffix(".json")
        if not side.exists():
            raise ReferenceError(f"{p}: no {side.name} sidecar naming the model that made these embeddings")
        info = json.loads(side.read_text())
        have = model_identity(info)
        if have != want:
            raise ReferenceError(f"{p} was made with {have}, the pool's CLIP scores with {want}: "
                                 "embed the reference with the same model")
        emb = np.load(p).astype(np.float32)
        labels = info.get("labels")
        if labels is not None and len(labels) != len(emb):
            raise ReferenceError(f"{side}: {len(labels)} labels for {len(emb)} embeddings")
    else:
        images, labels = _folder_images(p) if p.is_dir() and not any(p.glob("*.tar")) else _shard_images(source)
        if not images:
            raise ReferenceError(f"{source}: no reference images found")
        ok = decodable(images)
        skipped = len(images) - len(ok)
        if skipped:
            log.warning("reference %s: %d of %d image(s) do not decode and are skipped", source, skipped, len(images))
        if not ok:
            raise ReferenceError(f"{source}: none of its {len(images)} reference image(s) decodes")
        labels = [labels[i] for i in ok] if labels is not None else None
        emb = embed_images([images[i] for i in ok], describe)
        if emb.ndim != 2 or not len(emb):
            raise ReferenceError(f"{source}: empty reference embeddings")
        return Reference(emb / np.linalg.norm(emb, axis=1, keepdims=True), labels, skipped)
    if emb.ndim != 2 or not len(emb):
        raise ReferenceError(f"{source}: empty reference embeddings")
    return Reference(emb / np.linalg.norm(emb, axis=1, keepdims=True), labels)


def save_reference(emb: np.ndarray, describe: dict[str, Any], path: str | Path,
                   labels: list[str] | None = None) -> None:
    """A reusable .npy reference with its model sidecar (and labels, if any)."""
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float32))
    atomic_write_bytes(Path(path), buf.getvalue())
    side = model_identity(describe) | ({"labels": [str(x) for x in labels]} if labels is not None else {})
    atomic_write_bytes(Path(path).with_suffix(".json"), json.dumps(side).encode())


def nearest_centroids(centroids: np.ndarray, col: pa.FixedSizeListArray, budget: int = 1 << 24
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Centroid with the largest inner product (-1 for a null embedding; the nearest one when
    centroids are unit, as spherical k-means makes them) and the embedding's cosine similarity to it,
    for every row of a float16 embedding column.

    One BLAS matrix product and an argmax per chunk: for top-1 against a few thousand centroids
    this is several times faster than faiss's flat search (measured in ``make bench``), and chunks
    are converted to float32 just before their product so the work stays in cache. The similarity
    is recomputed row by row for the winning centroid, so its bits do not depend on how rows were
    chunked (a BLAS product's rounding can)."""
    from curate.io.embeddings import f16_to_f32

    cent = np.ascontiguousarray(centroids, dtype=np.float32)
    d = col.type.list_size
    n = len(col)
    chunk = max(1, min(4096, budget // max(1, len(cent))))  # bounds the (chunk, k) score matrix
    flat = col.values.slice(col.offset * d, n * d).to_numpy(zero_copy_only=False)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    ids = np.full(n, -1, dtype=np.int64)
    sims = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, chunk):
        x = f16_to_f32(flat[start * d:(start + chunk) * d]).reshape(-1, d)
        # The nearest centroid does not depend on the query's norm: no normalisation before the
        # product, only of the winning score.
        best = nearest(cent, x, rows_per_chunk=chunk)
        dot = np.einsum("ij,ij->i", x, cent[best])
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        ok = valid[start:start + chunk] & (norms > 0)
        ids[start:start + chunk] = np.where(ok, best, -1)
        sims[start:start + chunk] = np.where(ok, dot / np.maximum(norms, 1e-12), np.nan)
    return ids, sims


@register_stage
class ReferenceFilterStage(GlobalStage):
    """DataComp image-based filter: keep samples whose k-means cluster holds a reference embedding."""

    name = "reference_filter"
    columns = {
        "centroid": "the pool k-means centroid nearest the image embedding",
        "centroid_sim": "inner product of the unit image embedding with that centroid (cosine when centroids are unit)",
    }
    version = "2"

    class Params(Strict):
        embeddings_from: str = Field("clip_score", description="id of the clip_score stage whose image embeddings are clustered")
        reference: str = Field(..., description="folder of images, shards, or .npy (+ .json sidecar)")
        n_centroids: int | None = Field(None, ge=2, description="null: about sqrt(pool)/2, at least 8")
        centroids: str | None = Field(None, description="reuse centroids (.npy) from an earlier run")
        neighbors: int = Field(1, ge=1, description="reference sample -> its k nearest centroids")
        kmeans_sample: int = Field(500_000, ge=100, description="pool rows sampled to train the k-means")
        niter: int = Field(20, ge=1, description="k-means iterations")
        kmeans: Literal["spherical", "plain"] = Field(
            "spherical", description="spherical: unit centroids (cosine clusters); plain: mean centroids, as "
            "DataComp's image-based baseline trains them. Either way a sample joins the centroid with the "
            "largest inner product")
        seed: int = Field(0, description="seed of the k-means sample and initialisation")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("centroid", pa.int32()), pa.field("centroid_sim", pa.float32())]

    def reads(self) -> tuple[str, ...]:
        return (self.params.embeddings_from,)

    def preflight(self, model_cache: str | None = None) -> list[str]:
        from curate.io.shards import expand_input

        missing = []
        for key, path in (("reference", self.params.reference), ("centroids", self.params.centroids)):
            if not path or Path(path).expanduser().exists():
                continue
            try:
                expand_input(path)  # a glob or brace pattern of shards
            except Exception:
                missing.append(f"{self.stage_id}: {key} {path!r} not found")
        return missing

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string())]

    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        uids = ctx.index(["uid"]).column("uid").to_pylist()
        return {"uid": [u for u, e in zip(uids, ctx.evaluate) if e]}

    def _pool_embeddings(self, ctx: GlobalContext, shard: str) -> tuple[list[str], np.ndarray]:
        keep = set(read_table(ctx.work.partial(ctx.stage_id, shard)).column("uid").to_pylist())
        uids, emb = ctx.unit_embeddings(self.params.embeddings_from, "image_emb", shard, keep)
        return list(uids), emb

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        import faiss

        p = self.params
        work = ctx.work
        describe = ctx.describe(p.embeddings_from)
        if not describe:
            raise ReferenceError(f"no {p.embeddings_from} outputs with model metadata: the pool's embeddings "
                                 "cannot be matched to a model")
        ident = model_identity(describe)
        ref, labels, skipped = load_reference(p.reference, describe)
        if p.centroids:
            cent = np.load(p.centroids).astype(np.float32)
            side = Path(p.centroids).with_suffix(".json")
            if side.exists() and json.loads(side.read_text()).get("model_identity") != ident:
                raise ReferenceError(f"{p.centroids}: centroids were trained on another model's embeddings")
        else:
            n_pool = sum(num_rows(work.partial(ctx.stage_id, s)) for s in ctx.shards)
            share = sample_share(p.kmeans_sample, n_pool)
            sample, sampled = [], []
            for s in ctx.shards:
                uids, e = self._pool_embeddings(ctx, s)
                pick = uid_sample(uids, p.seed, share)
                sample.append(e[pick])
                sampled += [u for u, k in zip(uids, pick) if k]
            # by uid: the same rows in the same order whatever the sharding
            train = (np.concatenate(sample)[np.argsort(sampled, kind="stable")] if sampled
                     else np.zeros((0, ref.shape[1]), np.float32))
            k = p.n_centroids or max(8, int(math.sqrt(max(1, n_pool)) / 2))
            k = min(k, len(train))
            if k < 1:
                raise ReferenceError("no pool embeddings to cluster")
            cent = train_centroids(train, k, p.seed, niter=p.niter, spherical=p.kmeans == "spherical")
        if cent.shape[1] != ref.shape[1]:
            raise ReferenceError(f"reference embeddings are {ref.shape[1]}-d, the pool's {cent.shape[1]}-d")
        index = faiss.IndexFlatIP(cent.shape[1])
        index.add(np.ascontiguousarray(cent))
        _, nn = index.search(np.ascontiguousarray(ref), min(p.neighbors, len(cent)))
        chosen = sorted({int(c) for c in nn.ravel()})
        label_centroids: dict[str, set[int]] = {}
        for lab, row in zip(labels or [], nn):
            label_centroids.setdefault(lab, set()).update(int(c) for c in row)
        gdir = work.global_dir()
        buf = io.BytesIO()
        np.save(buf, cent.astype(np.float32))
        atomic_write_bytes(gdir / f"{ctx.stage_id}_centroids.npy", buf.getvalue())
        atomic_write_bytes(gdir / f"{ctx.stage_id}_centroids.json",
                           json.dumps({"model_identity": ident, "k": len(cent)}).encode())
        art = {"k": int(len(cent)), "reference_size": int(len(ref)), "reference_skipped": skipped,
               "reference_centroids": chosen,
               "model_identity": ident,
               "label_centroids": {k: sorted(v) for k, v in sorted(label_centroids.items())},
               "label_counts": dict(sorted(Counter(labels or []).items()))}
        atomic_write_bytes(gdir / f"{ctx.stage_id}.json", json.dumps(art, indent=2).encode())
        return ({k: v for k, v in art.items() if k not in ("reference_centroids", "label_centroids", "label_counts")}
                | {"n_reference_centroids": len(chosen), "reference_labels": len(label_centroids)})

    def apply(self, ctx: ShardContext) -> StageOutput:
        gdir = ctx.work.global_dir()
        art = json.loads((gdir / f"{ctx.stage_id}.json").read_text())
        chosen = set(art["reference_centroids"])
        cent = np.load(io.BytesIO((gdir / f"{ctx.stage_id}_centroids.npy").read_bytes()))
        col = ctx.read(self.params.embeddings_from, ["image_emb"]).column("image_emb").combine_chunks()
        ev = ctx.evaluate
        n = len(col)
        rows = np.flatnonzero(ev[:n])
        cid: list[int | None] = [None] * n
        sim: list[float | None] = [None] * n
        reasons: list[str | None] = [None] * n
        if len(rows):
            ids, sims = nearest_centroids(cent, col if len(rows) == n else col.take(pa.array(rows)))
            for i, c, v in zip(rows.tolist(), ids.tolist(), sims.tolist()):
                if c >= 0:
                    cid[i], sim[i] = c, v
                    reasons[i] = None if c in chosen else "reference:far_cluster"
        for i in range(n):
            if ev[i] and cid[i] is None:
                reasons[i] = "reference:no_embedding"
        return StageOutput({"centroid": cid, "centroid_sim": sim}, reasons)
