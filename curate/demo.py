"""`make demo`: synthesize a pool, run the demo pipeline on a LocalCluster, explain the result."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import polars as pl

from curate.cli import _setup_logging
from curate.config import load_pipeline, load_run_config
from curate.decisions import decisions
from curate.pipeline import run_pipeline
from curate.engine import make_executor
from curate.export import ExportSpec, export
from curate.report.html import write_report
from curate.stats import format_funnel, format_globals, funnel, global_summaries
from curate.synth import SYNTH_VERSION, synthesize

log = logging.getLogger("curate.demo")
ROOT = Path(__file__).resolve().parent.parent


def defect_table(workdir: Path, truth_path: Path) -> pl.DataFrame:
    """Per ground-truth label: share removed by the filters, by balancing (a sampling step that
    also drops clean samples, by design), and kept. For duplicates one sample of each group stays:
    the copy or its source, whichever scores higher."""
    truth = pl.read_parquet(truth_path, columns=["uid", "label"])
    d = decisions(workdir).join(truth, on="uid", how="left")
    return (d.group_by("label").agg(
        pl.len().alias("samples"),
        ((~pl.col("kept")) & (pl.col("dropped_by") != "balance").fill_null(True)).mean().alias("removed_by_filters"),
        (pl.col("dropped_by") == "balance").fill_null(False).mean().alias("removed_by_balance"),
        pl.col("kept").mean().alias("kept"))
        .sort("label"))


SCORER = f"curate-tiny-synth-v{SYNTH_VERSION}.pt"


def ensure_scorer(models: Path, seed: int = 0) -> Path:
    """The tiny CLIP the demo scores with: trained once on clean synthetic pairs, then cached."""
    from curate.evaluation import evaluate_clip
    from curate.training import TrainSpec, train_clip

    ckpt = models / SCORER
    if ckpt.exists():
        log.info("tiny CLIP scorer cached at %s (delete it to retrain)", ckpt)
        return ckpt
    train_dir = ROOT / "demo" / f"scorer-train-v{SYNTH_VERSION}"
    heldout = ROOT / "demo" / f"heldout-v{SYNTH_VERSION}"
    if not (train_dir / "ground_truth.parquet").exists():
        synthesize(train_dir, samples=5000, shards=5, seed=1000 + seed, fractions={})
    if not (heldout / "ground_truth.parquet").exists():
        synthesize(heldout, samples=1000, shards=1, seed=2000 + seed, fractions={})
    log.info("training the tiny CLIP scorer with open_clip_train (a few minutes on 2 cores)")
    path = train_clip(str(train_dir / "*.tar"), models, TrainSpec(epochs=4, seed=seed), name=Path(SCORER).stem)
    metrics = evaluate_clip("curate-tiny", str(path), heldout)
    (models / f"{Path(SCORER).stem}.eval.json").write_text(json.dumps(metrics, indent=2))
    log.info("tiny CLIP on held-out clean pairs: %s", metrics)
    if metrics["match_vs_shuffled_auc"] < 0.9:
        log.error("tiny CLIP scorer AUC %.3f is below 0.9: CLIP scores will be weak", metrics["match_vs_shuffled_auc"])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="curate.demo")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "demo.yaml"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    _setup_logging(False)
    cfg = load_run_config(a.config)
    pool = ROOT / "demo" / f"pool-v{SYNTH_VERSION}"
    if not (pool / "ground_truth.parquet").exists():
        synthesize(pool, samples=a.samples, shards=a.shards, seed=a.seed)
    models = ROOT / "demo" / "models"
    ensure_scorer(models, a.seed)
    cfg = cfg.model_copy(update={"input": str(pool / "*.tar"), "workdir": str(ROOT / "demo" / "work"),
                                 "model_cache": str(models)})
    summary = run_pipeline(load_pipeline(a.pipeline), cfg)
    print("\n== funnel (read back from demo/work/stats) ==")
    print(format_funnel(funnel(summary.workdir)))
    print("\n== per ground-truth label (ground_truth.parquet): share removed by the filters, by balancing, kept ==")
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True, float_precision=3):
        print(defect_table(Path(summary.workdir), pool / "ground_truth.parquet"))
    glob = global_summaries(summary.workdir)
    if glob:
        print("\n" + format_globals(glob))
    if not summary.ok:
        print("\n".join(summary.problems()), file=sys.stderr)
        return 1
    out = ROOT / "demo" / "out"
    with make_executor(cfg) as ex:
        manifest = export(summary.workdir, out, ex, ExportSpec(shard_size=1000, shuffle_seed=a.seed))
    report = write_report(summary.workdir)
    print(f"\n== outputs ==\nwork dir:  {summary.workdir}\n"
          f"stats:     {summary.workdir}/stats/<stage>/<shard>.parquet (curate stats {summary.workdir})\n"
          f"curated:   {out}/metadata/*.parquet, {out}/shards/*.tar ({manifest['samples_kept']} samples in "
          f"{manifest['output_shards']} shards), {out}/uids.npy, {out}/manifest.json\n"
          f"report:    {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
