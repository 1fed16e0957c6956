"""negCLIPLoss and NormSim (Wang et al., arXiv 2405.19547) from the embeddings a clip_score stage
stored: no second forward pass.

negCLIPLoss: the CLIP score of a pair minus how well its image and caption also match the other
pairs of a random batch, ``s_ii - tau/2 * (LME_j(s_ij / tau) + LME_j(s_ji / tau))`` averaged over
``batches`` random batches (LME: log-mean-exp, i.e. logsumexp minus log of the batch size, so shards
of different sizes give comparable values; for a fixed batch size it is the paper's
``-tau * CLIPLoss`` up to a constant). A pair whose caption would also fit many other images (a
generic caption) scores lower than its CLIP score alone says. Batches are drawn within a shard
(img2dataset shards are random samples of the pool), seeded by the shard name and ``seed``.

NormSim: how close each image is to a target set (e.g. ImageNet-1k train images embedded with the
same model): ``normsim_inf`` the largest cosine to a target image, ``normsim_2`` the L2 norm of
the cosines. Rank either with ``clip_rank`` (``scores_from: <this stage>``, ``score_column``).
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.io.embeddings import embeddings
from curate.stages.base import MapStage, ShardContext, Stage, StageOutput, embedding_source
from curate.stages.registry import register_stage

BLOCK = 4096  # rows of a batch whose similarities are in memory at once


def log_mean_exp_both(img: np.ndarray, txt: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a batch of unit image and text embeddings: LME over the batch of image->text
    scores / tau, and of text->image scores / tau; memory bounded by BLOCK rows."""
    import torch

    i_t, t_t = torch.from_numpy(img), torch.from_numpy(txt)
    n = len(img)
    rows = torch.empty(n, dtype=torch.float64)
    cols = torch.full((n,), -torch.inf, dtype=torch.float64)
    for a in range(0, n, BLOCK):
        s = (i_t[a:a + BLOCK] @ t_t.T).double() / tau  # images a.. against every caption
        rows[a:a + BLOCK] = torch.logsumexp(s, dim=1)
        cols = torch.logaddexp(cols, torch.logsumexp(s, dim=0))
    shift = float(np.log(n))
    return (rows - shift).numpy(), (cols - shift).numpy()


def neg_clip_loss(img: np.ndarray, txt: np.ndarray, tau: float, batch_size: int, batches: int,
                  rng: np.random.Generator) -> np.ndarray:
    """negCLIPLoss of each pair (unit float32 embeddings, one row per pair)."""
    n = len(img)
    score = np.einsum("ij,ij->i", img, txt).astype(np.float64)
    if n == 0:
        return score
    b = min(batch_size, n)
    norm = np.zeros(n)
    for _ in range(batches):
        perm = rng.permutation(n)
        for start in range(0, n, b):
            real = perm[start:start + b]
            # a short last batch is filled up with rows of the permutation's start, which serve
            # as negatives only, so every row is normalised against a batch of the same size
            idx = np.concatenate([real, perm[:b - len(real)]]) if len(real) < b else real
            lr, lc = log_mean_exp_both(img[idx], txt[idx], tau)
            norm[real] += tau / 2 * (lr[:len(real)] + lc[:len(real)])
    return score - norm / batches


def norm_sim(img: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max cosine, L2 norm of the cosines) of each image to the target set."""
    best = np.empty(len(img))
    l2 = np.empty(len(img))
    for a in range(0, len(img), BLOCK):
        s = img[a:a + BLOCK] @ target.T
        best[a:a + BLOCK] = s.max(axis=1)
        l2[a:a + BLOCK] = np.sqrt(np.einsum("ij,ij->i", s, s))
    return best, l2


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(x).all(axis=1) & (norms > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok


@register_stage
class ClipLossStage(MapStage):
    """negCLIPLoss and NormSim from stored CLIP embeddings, for clip_rank to rank (arXiv 2405.19547)."""

    name = "clip_loss"
    filters = False
    version = "1"
    columns = {
        "negclip_loss": "CLIP score minus tau/2 x (log-mean-exp of the pair's image and caption scores against a "
                        "random batch / tau), averaged over random batches (higher: more specific match)",
        "normsim_inf": "largest cosine between the image and a target-set image (null without a target)",
        "normsim_2": "L2 norm of the image's cosines to the target-set images (null without a target)",
    }

    class Params(Strict):
        embeddings_from: str = Field("clip_score", description="id of the clip_score stage whose stored image and "
                                     "caption embeddings are used")
        tau: float = Field(0.01, gt=0, le=1, description="temperature of the contrastive normaliser (the paper: "
                           "the teacher CLIP's, 0.01 for OpenAI models)")
        batch_size: int = Field(32768, ge=2, description="random batch size (at most the shard's rows)")
        batches: int = Field(10, ge=1, le=1000, description="random batches averaged per pair")
        seed: int = Field(0, description="seed of the batches (with the shard name)")
        target: str | None = Field(None, description="NormSim target set: a .npy of embeddings with its model "
                                   "sidecar, a folder of images or shards (as reference_filter); null: no NormSim")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

    def __init__(self, params: Strict, stage_id: str | None = None):
        super().__init__(params, stage_id)
        self._target: np.ndarray | None = None

    def reads(self) -> tuple[str, ...]:
        return (self.params.embeddings_from,)

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("negclip_loss", pa.float32()), pa.field("normsim_inf", pa.float32()),
                pa.field("normsim_2", pa.float32())]

    def with_earlier(self, earlier: list[Stage]) -> "ClipLossStage":
        embedding_source(self.stage_id, earlier, self.params.embeddings_from)  # raises if it stores none
        return self

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        from pathlib import Path

        t = self.params.target
        if not t or not Path(t).exists():
            return {}
        files = sorted(Path(t).rglob("*")) if Path(t).is_dir() else [Path(t), Path(t).with_suffix(".json")]
        return {"target": [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]}

    def preflight(self, model_cache: str | None = None) -> list[str]:
        from pathlib import Path

        from curate.io.shards import expand_input

        t = self.params.target
        if not t or Path(t).expanduser().exists():
            return []
        try:
            expand_input(t)
        except Exception:
            return [f"{self.stage_id}: target {t!r} not found"]
        return []

    def target(self, ctx: ShardContext) -> np.ndarray:
        """Unit target embeddings, checked against (or made with) the pool's model; once per process."""
        if self._target is None:
            from curate.stages.reference import load_reference

            self._target = load_reference(self.params.target, ctx.describe(self.params.embeddings_from))[0]
        return self._target

    def process(self, ctx: ShardContext) -> StageOutput:
        p = self.params
        rows = ctx.rows()
        t = ctx.read(p.embeddings_from, ["image_emb", "text_emb"])
        img, ok_i = _unit(embeddings(t, "image_emb")[rows])
        txt, ok_t = _unit(embeddings(t, "text_emb")[rows])
        ok = np.flatnonzero(ok_i & ok_t)
        seed = int.from_bytes(hashlib.blake2b(ctx.shard.encode(), digest_size=8).digest(), "little")
        loss = neg_clip_loss(img[ok], txt[ok], p.tau, p.batch_size, p.batches, np.random.default_rng([p.seed, seed]))
        cols: dict[str, list] = {c: [None] * len(rows) for c in ("negclip_loss", "normsim_inf", "normsim_2")}
        for j, v in zip(ok.tolist(), loss.tolist()):
            cols["negclip_loss"][j] = v
        if p.target:
            target = self.target(ctx)
            if target.shape[1] != img.shape[1]:
                raise RuntimeError(f"target {p.target} has {target.shape[1]}-d embeddings, the pool {img.shape[1]}-d")
            valid = np.flatnonzero(ok_i)
            best, l2 = norm_sim(img[valid], target)
            for j, b, q in zip(valid.tolist(), best.tolist(), l2.tolist()):
                cols["normsim_inf"][j], cols["normsim_2"][j] = b, q
        return ctx.scatter(cols, rows)
