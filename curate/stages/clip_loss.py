"""negCLIPLoss and NormSim (Wang et al., arXiv 2405.19547) from the embeddings a clip_score stage
stored: no second forward pass.

negCLIPLoss: the CLIP score of a pair minus how well its image and caption also match the other
pairs of a random batch, ``s_ii - tau/2 * (LME_j(s_ij / tau) + LME_j(s_ji / tau))`` averaged over
``batches`` rounds (LME: log-mean-exp, i.e. logsumexp minus log of the batch size, so batches of
slightly different sizes give comparable values; for a fixed batch size it is the paper's
``-tau * CLIPLoss`` up to a constant). A pair whose caption would also fit many other images (a
generic caption) scores lower than its CLIP score alone says.

As in the paper, batches are drawn from the whole pool: in round ``k`` each pair goes to batch
``bucket(hash(uid, seed), k, n / batch_size)``, so a pair meets the same batch-mates whatever the
sharding. summarize lists each shard's scored uids; combine computes the batches, partitioned by
(round, batch) across tasks so no task holds the pool's embeddings; apply adds the CLIP score.

NormSim: how close each image is to a target set (e.g. ImageNet-1k train images embedded with the
same model): ``normsim_inf`` the largest cosine to a target image, ``normsim_2`` the L2 norm of
the cosines. Rank either with ``clip_rank`` (``scores_from: <this stage>``, ``score_column``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from curate.algorithms.sampling import bucket, uid_keys
from curate.core.config import Strict
from curate.io.embeddings import embeddings
from curate.io.parquet import read_frame, read_table
from curate.contract.base import GlobalContext, GlobalStage, ShardContext, Stage, StageOutput, embedding_source
from curate.contract.registry import register_stage

BLOCK = 4096  # rows of a batch whose similarities are in memory at once
PART_ROWS = 400_000  # (pair, round) entries per combine task: a part's embeddings then take ~2.5 GB at 768-d


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


def n_batches(pairs: int, batch_size: int) -> int:
    """Batches per round over a pool of ``pairs``: each about ``batch_size`` pairs."""
    return max(1, round(pairs / batch_size))


def round_normalisers(img: np.ndarray, txt: np.ndarray, batch: np.ndarray, tau: float) -> np.ndarray:
    """``tau/2 * (LME row + LME column)`` of each row within its batch of one round (``batch``: the
    batch id of each row, -1 for rows not computed here). A batch's rows keep their order in the
    arrays, so callers give the rows in uid order."""
    out = np.full(len(img), np.nan)
    order = np.argsort(batch, kind="stable")
    ids = batch[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
    for s, e in zip(starts, np.r_[starts[1:], len(ids)]):
        if ids[s] < 0:
            continue
        g = order[s:e]
        lr, lc = log_mean_exp_both(img[g], txt[g], tau)
        out[g] = tau / 2 * (lr + lc)
    return out


def pair_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """The CLIP score of each (unit) pair, as float64."""
    return np.einsum("ij,ij->i", img, txt).astype(np.float64)


def neg_clip_loss(img: np.ndarray, txt: np.ndarray, keys: np.ndarray, tau: float, batch_size: int,
                  batches: int) -> np.ndarray:
    """negCLIPLoss of each pair of a whole pool held in memory (unit float32 embeddings, one row per
    pair, in uid order; ``keys``: ``uid_keys`` of the pairs). The stage computes the same values
    with the batches spread over tasks."""
    nb = n_batches(len(img), batch_size)
    norm = np.zeros(len(img))
    for k in range(batches):
        norm += round_normalisers(img, txt, bucket(keys, k, nb), tau)
    return pair_scores(img, txt) - norm / batches


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
class ClipLossStage(GlobalStage):
    """negCLIPLoss (batches drawn from the whole pool) and NormSim from stored CLIP embeddings, for
    clip_rank to rank (arXiv 2405.19547)."""

    name = "clip_loss"
    filters = False
    version = "2"
    columns = {
        "negclip_loss": "CLIP score minus tau/2 x (log-mean-exp of the pair's image and caption scores against a "
                        "random batch of the pool / tau), averaged over rounds of batches (higher: more specific match)",
        "normsim_inf": "largest cosine between the image and a target-set image (null without a target)",
        "normsim_2": "L2 norm of the image's cosines to the target-set images (null without a target)",
    }

    class Params(Strict):
        embeddings_from: str = Field("clip_score", description="id of the clip_score stage whose stored image and "
                                     "caption embeddings are used")
        tau: float = Field(0.01, gt=0, le=1, description="temperature of the contrastive normaliser (the paper: "
                           "the teacher CLIP's, 0.01 for OpenAI models)")
        batch_size: int = Field(32768, ge=2, description="random batch size, drawn from the whole pool (a pool "
                                "smaller than this is one batch)")
        batches: int = Field(10, ge=1, le=1000, description="rounds of random batches averaged per pair")
        seed: int = Field(0, description="seed of the batches (with each pair's uid)")
        partitions: int | None = Field(None, ge=1, description="combine tasks; null: one per ~400k (pair, round) "
                                       "entries. Any value gives the same results")
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

    def partial_fields(self) -> list[pa.Field]:
        return [pa.field("uid", pa.string()), pa.field("row", pa.int64()), pa.field("key", pa.uint64())]

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

    def fingerprint_params(self) -> dict[str, Any]:
        return {k: v for k, v in super().fingerprint_params().items() if k != "partitions"}

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

    def format_summary(self, s: dict[str, Any]) -> list[str]:
        return [f"{self.stage_id}: negCLIPLoss over {s.get('pairs')} pairs, {s.get('rounds')} rounds of "
                f"{s.get('batches_per_round')} pool-wide batches, {s.get('partitions')} combine task(s)"]

    def _unit_pairs(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Unit image and caption embeddings, and which rows have a valid image / a valid pair."""
        img, ok_i = _unit(embeddings(table, "image_emb"))
        txt, ok_t = _unit(embeddings(table, "text_emb"))
        return img, txt, ok_i, ok_i & ok_t

    # -- summarize: the scored pairs of a shard -----------------------------------------------
    def summarize(self, ctx: ShardContext) -> dict[str, Any]:
        rows = np.asarray(ctx.rows(), dtype=np.int64)
        *_, ok = self._unit_pairs(ctx.read(self.params.embeddings_from, ["image_emb", "text_emb"]).take(rows))
        rows = rows[ok]
        uids = ctx.column("uid", rows.tolist())
        return {"uid": uids, "row": rows.tolist(), "key": uid_keys(uids, self.params.seed)}

    # -- combine: the batches, partitioned by (round, batch) ------------------------------------
    def _pairs(self, ctx: GlobalContext) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in ctx.partials())

    def combine_parts(self, ctx: GlobalContext) -> int:
        p = self.params
        parts = p.partitions or math.ceil(self._pairs(ctx) * p.batches / PART_ROWS)
        return parts if parts > 1 else 0

    def combine_part(self, ctx: GlobalContext, part: int, parts: int) -> pa.Table:
        """The normaliser of each pair in each round whose batch falls to this part: (uid, round,
        value). Every shard is read; only this part's pairs are kept in memory."""
        p = self.params
        nb = n_batches(self._pairs(ctx), p.batch_size)
        uids: list[np.ndarray] = []
        imgs: list[np.ndarray] = []
        txts: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        for shard, path in zip(ctx.shards, ctx.partials()):
            f = read_frame(path, columns=["uid", "row", "key"])
            keys = f["key"].to_numpy()
            b = np.stack([bucket(keys, k, nb) for k in range(p.batches)], axis=1) if len(keys) else \
                np.zeros((0, p.batches), dtype=np.int64)
            mine = (np.arange(p.batches) * nb + b) % parts == part
            take = np.flatnonzero(mine.any(axis=1))
            if not len(take):
                continue
            table = ctx.read(p.embeddings_from, shard, ["image_emb", "text_emb"]).take(f["row"].to_numpy()[take])
            img, txt, _, _ = self._unit_pairs(table)
            uids.append(f["uid"].to_numpy()[take])
            imgs.append(img)
            txts.append(txt)
            ids.append(np.where(mine[take], b[take], -1))
        if not uids:
            return pa.table({"uid": pa.array([], pa.string()), "round": pa.array([], pa.int32()),
                             "value": pa.array([], pa.float64())})
        uid = np.concatenate(uids)
        order = np.argsort(uid, kind="stable")  # batch-mates in uid order, whatever the sharding
        uid, img, txt, batch = uid[order], np.concatenate(imgs)[order], np.concatenate(txts)[order], \
            np.concatenate(ids)[order]
        out_uid, out_round, out_value = [], [], []
        for k in range(p.batches):
            v = round_normalisers(img, txt, batch[:, k], p.tau)
            sel = np.flatnonzero(batch[:, k] >= 0)
            out_uid.append(uid[sel])
            out_round.append(np.full(len(sel), k, dtype=np.int32))
            out_value.append(v[sel])
        return pa.table({"uid": pa.array(np.concatenate(out_uid).tolist(), pa.string()),
                         "round": np.concatenate(out_round), "value": np.concatenate(out_value)})

    def combine(self, ctx: GlobalContext) -> dict[str, Any]:
        p = self.params
        parts = self.combine_parts(ctx)
        tables = [read_table(f) for f in ctx.parts(parts)] if parts else [self.combine_part(ctx, 0, 1)]
        entries = pl.from_arrow(pa.concat_tables(tables)).sort(["uid", "round"])
        # one column per round, summed in round order: the same float sum whatever the parts
        wide = entries.pivot(on="round", index="uid", values="value", sort_columns=True) if entries.height else \
            pl.DataFrame(schema={"uid": pl.String})
        norm = np.zeros(wide.height)
        for k in range(p.batches):
            norm += wide[str(k)].to_numpy() if str(k) in wide.columns else np.nan
        shard_of = pl.concat([read_frame(path, columns=["uid"]).with_columns(pl.lit(s).alias("shard"))
                              for s, path in zip(ctx.shards, ctx.partials())]) if ctx.shards else \
            pl.DataFrame(schema={"uid": pl.String, "shard": pl.String})
        out = shard_of.join(wide.select("uid").with_columns(pl.Series("negclip_norm", norm / p.batches)),
                            on="uid", how="left").with_columns(pl.lit(None, dtype=pl.String).alias("reason"))
        self.write_results(ctx, out)
        return {"pairs": shard_of.height, "rounds": p.batches,
                "batches_per_round": n_batches(shard_of.height, p.batch_size), "partitions": max(parts, 1)}

    # -- apply: CLIP score minus the normaliser, and NormSim --------------------------------------
    def target(self, ctx: ShardContext) -> np.ndarray:
        """Unit target embeddings, checked against (or made with) the pool's model; once per process."""
        if self._target is None:
            from curate.stages.reference_filter import load_reference

            self._target = load_reference(self.params.target, ctx.describe(self.params.embeddings_from))[0]
        return self._target

    def apply(self, ctx: ShardContext) -> StageOutput:
        p = self.params
        rows = np.asarray(ctx.rows(), dtype=np.int64)
        img, txt, ok_img, ok = self._unit_pairs(ctx.read(p.embeddings_from, ["image_emb", "text_emb"]).take(rows))
        norm = ctx.lookup(self.results_dir(ctx.work) / f"{ctx.shard}.parquet", ["negclip_norm"])["negclip_norm"]
        score = pair_scores(img, txt)
        cols: dict[str, list] = {c: [None] * len(rows) for c in ("negclip_loss", "normsim_inf", "normsim_2")}
        for j, r in enumerate(rows.tolist()):
            if ok[j] and norm[r] is not None:
                cols["negclip_loss"][j] = float(score[j] - norm[r])
        if p.target:
            target = self.target(ctx)
            if target.shape[1] != img.shape[1]:
                raise RuntimeError(f"target {p.target} has {target.shape[1]}-d embeddings, the pool {img.shape[1]}-d")
            valid = np.flatnonzero(ok_img)
            best, l2 = norm_sim(img[valid], target)
            for j, b, q in zip(valid.tolist(), best.tolist(), l2.tolist()):
                cols["normsim_inf"][j], cols["normsim_2"][j] = b, q
        return ctx.scatter(cols, rows.tolist())
