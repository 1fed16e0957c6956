"""negCLIPLoss against the raw operation it sits on: one batch's symmetric cross-entropy in torch
(the whole batch x batch logits in memory, as CLIP training computes it), on the same random unit
embeddings; and NormSim against a plain matmul + max. Same values, bounded memory."""
from __future__ import annotations

import numpy as np

from curate.bench.common import peak_rss_mb, save, timer
from curate.algorithms.sampling import uid_keys
from curate.stages.clip_loss import neg_clip_loss, norm_sim


def run(n: int = 8192, d: int = 768, targets: int = 10_000) -> dict:
    import torch

    rng = np.random.default_rng(0)
    img = rng.normal(size=(n, d)).astype(np.float32)
    txt = rng.normal(size=(n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    tau = 0.01
    with timer() as t_ours:
        ours = neg_clip_loss(img, txt, uid_keys([str(i) for i in range(n)], 0), tau, batch_size=n, batches=1)
    with timer() as t_raw:
        logits = torch.from_numpy(img).double() @ torch.from_numpy(txt).double().T / tau
        y = torch.arange(n)
        ce = (torch.nn.functional.cross_entropy(logits, y, reduction="none")
              + torch.nn.functional.cross_entropy(logits.T, y, reduction="none")) / 2
        raw = (-tau * ce).numpy() + tau * np.log(n)
    target = rng.normal(size=(targets, d)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    with timer() as t_ns:
        best, _ = norm_sim(img, target)
    with timer() as t_ns_raw:
        best_raw = (img @ target.T).max(axis=1)
    res = {"pairs": n, "dim": d, "batch": n,
           "negclip_s": round(t_ours["seconds"], 2), "raw_cross_entropy_s": round(t_raw["seconds"], 2),
           "ratio_raw_over_ours": round(t_raw["seconds"] / t_ours["seconds"], 2),
           "max_abs_diff": float(np.abs(ours - raw).max()),
           "normsim_s": round(t_ns["seconds"], 2), "raw_matmul_max_s": round(t_ns_raw["seconds"], 2),
           "normsim_equal": bool(np.allclose(best, best_raw, atol=1e-5)), "targets": targets,
           "peak_rss_mb": round(peak_rss_mb())}
    save("clip_loss", res)
    return res
