"""The classifier filter against the CLIP-score rule at the same cost, on the synthetic pool.

The demo pool (5,000 samples, 6 % ``mismatch``: the caption describes another shape in another
colour) goes through the demo's caption and image filters and is scored by the demo's tiny CLIP;
the classifier stage classifies each surviving image over the pool's shapes, and separately over
its colours, with prompts written for the task. Each rule's drops are compared with the
``mismatch`` label (precision, recall), and the CLIP-score rule drops the same number of pairs
(the lowest scores) among the same survivors.
"""
from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from curate.bench.common import BENCH_DIR, ROOT, save, timer
from curate.core.config import PipelineConfig, RunConfig, StageSpec
from curate.runner.registry import load_pipeline
from curate.runner.pipeline import run_pipeline
from curate.tools.demo import SCORER, ensure_scorer
from curate.tools.evaluation import zero_shot_tasks
from curate.tools.synth import POOL_VERSION, synthesize

log = logging.getLogger("curate.bench.classifier")
VOCAB = ROOT / "pipelines" / "vocab"


def _pool() -> Path:
    pool = ROOT / "demo" / f"pool-v{POOL_VERSION}-5000x10-seed0"
    if not (pool / "ground_truth.parquet").exists():
        synthesize(pool, samples=5000, shards=10, seed=0)
    return pool


def precision_recall(dropped: pl.Series, truth: pl.Series) -> dict[str, float]:
    tp = int((dropped & truth).sum())
    n = int(dropped.sum())
    return {"dropped": n, "precision": round(tp / n, 4) if n else None,
            "recall": round(tp / int(truth.sum()), 4) if int(truth.sum()) else None}


def compare(work, truth: pl.DataFrame, stage_id: str) -> dict:
    cls = pl.read_parquet(work / stage_id / "*.parquet", columns=["uid", "cls_decision"])
    clip = pl.read_parquet(work / "clip_score" / "*.parquet", columns=["uid", "clip_score"])
    d = (cls.join(clip, on="uid").join(truth.select("uid", "label"), on="uid")
         .filter(pl.col("cls_decision").is_in(["match", "unsure", "mismatch"])))
    is_mismatch = d["label"] == "mismatch"
    by_classifier = d["cls_decision"] == "mismatch"
    n = int(by_classifier.sum())
    lowest = set(d.sort(["clip_score", "uid"]).head(n)["uid"].to_list())
    by_clip = d["uid"].is_in(list(lowest))
    return {"rows": d.height, "mismatches": int(is_mismatch.sum()),
            "unsure": int((d["cls_decision"] == "unsure").sum()),
            "classifier": precision_recall(by_classifier, is_mismatch),
            "clip_score_same_cost": precision_recall(by_clip, is_mismatch)}


def run() -> dict:
    pool = _pool()
    models = ROOT / "demo" / "models"
    ensure_scorer(models)
    tasks = zero_shot_tasks()
    demo = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    # the demo's caption and image filters first: the classifier judges pairs whose caption and
    # image are usable, as in a pipeline (a caption in German names no English class)
    stages = [s for s in demo.stages if s.name in ("text", "image", "clip_score")]
    work = BENCH_DIR / "classifier"
    cfg = RunConfig.model_validate({"input": str(pool / "*.tar"), "workdir": str(work), "model_cache": str(models),
                                    "executor": {"kind": "inprocess"}})
    truth = pl.read_parquet(pool / "ground_truth.parquet")
    res = {"pool": pool.name, "scorer": SCORER, "filters_before": "demo.yaml text + image", "top_k": 1,
           "min_confidence": 0.5}
    # one run per vocabulary in the same work dir: the shared stages are computed once (resume)
    for vocab, task in (("shapes", "shape"), ("colours", "colour")):
        cls = StageSpec(name="classifier", id=f"classifier_{vocab}", params={
            "vocabulary": str(VOCAB / f"synthetic_{vocab}.txt"), "templates": list(tasks[task].templates),
            "top_k": 1, "min_confidence": 0.5})
        with timer() as t:
            assert run_pipeline(PipelineConfig(name="classifier_bench", stages=[*stages, cls]), cfg).ok
        res[f"seconds_{vocab}"] = round(t["seconds"], 1)
        res[vocab] = compare(work, truth, f"classifier_{vocab}")
        log.info("%s: %s", vocab, res[vocab])
    save("classifier", res)
    return res
