"""`make demo`: synthesize a pool, run the demo pipeline on a LocalCluster, explain the result."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from curate.core.logs import setup_logging
from curate.core.config import PipelineConfig, load_run_config
from curate.runner.registry import load_pipeline
from curate.report.decisions import decisions, run_record
from curate.runner.pipeline import run_pipeline
from curate.engine import make_executor
from curate.report.export import ExportSpec, export
from curate.report.html import write_report
from curate.report.stats import format_funnel, format_globals, funnel, global_summaries
from curate.tools.synth import POOL_VERSION, SYNTH_VERSION, synthesize
from curate.tools.training import file_sha256

log = logging.getLogger("curate.tools.demo")
ROOT = Path(__file__).resolve().parents[2]


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


DUPLICATE_LABELS = ("exact_duplicate", "near_duplicate")


@dataclass(frozen=True)
class Bounds:
    """What "curation worked" means on the synthetic pool (its ground truth knows every defect)."""

    min_clean_kept: float = 0.90  # share of clean samples the filters keep (balancing is sampling, not judged)
    min_defect_removed: float = 0.95  # share of each non-duplicate defect the filters remove
    max_kept_per_duplicate_group: int = 1  # a source and its copies


def self_check(workdir: Path, truth_path: Path, bounds: Bounds = Bounds()) -> list[tuple[str, bool, str]]:
    """(check, passed, what was measured) for every bound, from the decisions read back from the
    work dir and the pool's ground truth."""
    table = defect_table(workdir, truth_path)
    checks = []
    for row in table.iter_rows(named=True):
        label, removed = row["label"], row["removed_by_filters"]
        if label == "clean":
            checks.append((f"clean kept by the filters >= {bounds.min_clean_kept:.0%}",
                           1 - removed >= bounds.min_clean_kept, f"{1 - removed:.1%} of {row['samples']}"))
        elif label not in DUPLICATE_LABELS:
            checks.append((f"{label} removed >= {bounds.min_defect_removed:.0%}",
                           removed >= bounds.min_defect_removed, f"{removed:.1%} of {row['samples']}"))
    truth = pl.read_parquet(truth_path, columns=["uid", "dup_of"])
    # on what dedup kept, before a later stage (balancing samples) can hide a copy it missed
    dedup = [s["id"] for s in run_record(workdir)["stages"] if s["name"] == "dedup"]
    kept = decisions(workdir, until=dedup[-1] if dedup else None).filter(pl.col("kept")).join(truth, on="uid", how="left")
    in_groups = set(truth["dup_of"].drop_nulls().to_list())
    per_group = (kept.with_columns(pl.coalesce("dup_of", "uid").alias("group"))
                 .filter(pl.col("group").is_in(in_groups)).group_by("group").len())
    worst = int(per_group["len"].max() or 0) if per_group.height else 0
    over = int((per_group["len"] > bounds.max_kept_per_duplicate_group).sum()) if per_group.height else 0
    checks.append((f"every duplicate group keeps <= {bounds.max_kept_per_duplicate_group} sample",
                   over == 0, f"{len(in_groups)} groups, {over} over the bound (most kept in one: {worst})"))
    return checks


def format_checks(checks: list[tuple[str, bool, str]]) -> str:
    lines = [f"  {'PASS' if ok else 'FAIL'}  {name:<46} {seen}" for name, ok, seen in checks]
    verdict = ("curation worked: every check passed" if all(ok for _, ok, _ in checks) else
               f"curation did NOT work: {sum(not ok for _, ok, _ in checks)} check(s) failed")
    return "\n".join(lines + [verdict])


SCORER = f"curate-tiny-synth-v{SYNTH_VERSION}.pt"


def _scorer_spec():
    """Batch 64, 6 epochs over 5,000 pairs at 32 px: with fewer epochs the held-out AUC stays near
    0.97 but the CLIP rule misses more than 5 % of the demo's mismatched captions; batch 32 (more,
    cheaper steps) learns less in the same time."""
    from curate.tools.training import TrainSpec

    return TrainSpec(epochs=6, batch_size=64, warmup=50)


def ensure_scorer(models: Path, seed: int = 0, name: str = Path(SCORER).stem, train_seed: int | None = None) -> Path:
    """The tiny CLIP the demo scores with, trained on clean synthetic pairs (the sets of ``seed``)
    with training seed ``train_seed`` (default ``seed``), saved as ``models/<name>.pt``. Training is
    deterministic (curate.models.train_entry): every machine gets the same checkpoint bytes, and a
    checkpoint made by the same spec from the same data is reused."""
    from curate.tools.evaluation import evaluate_clip
    from curate.tools.training import file_sha256, train_clip

    train_dir, heldout = demo_sets(seed)
    spec = replace(_scorer_spec(), seed=seed if train_seed is None else train_seed)
    path = train_clip(str(train_dir / "*.tar"), models, spec, name=name)
    side = models / f"{name}.eval.json"
    digest = file_sha256(path)
    metrics = json.loads(side.read_text()) if side.exists() else {}
    if metrics.get("sha256") != digest:
        metrics = evaluate_clip("curate-tiny", str(path), heldout) | {"sha256": digest}
        side.write_text(json.dumps(metrics, indent=2))
    log.info("tiny CLIP scorer %s: sha256 %s, held-out matched-vs-shuffled AUC %.4f",
             path.name, digest, metrics["match_vs_shuffled_auc"])
    if metrics["match_vs_shuffled_auc"] < 0.9:
        log.error("tiny CLIP scorer AUC %.3f is below 0.9: CLIP scores will be weak", metrics["match_vs_shuffled_auc"])
    return path


def demo_sets(seed: int = 0) -> tuple[Path, Path]:
    """The scorer's training pool and the held-out clean pairs (evaluation and calibration)."""
    train_dir = ROOT / "demo" / f"scorer-train-v{SYNTH_VERSION}"
    heldout = ROOT / "demo" / f"heldout-v{SYNTH_VERSION}"
    if not (train_dir / "ground_truth.parquet").exists():
        synthesize(train_dir, samples=5000, shards=5, seed=1000 + seed, fractions={})
    if not (heldout / "ground_truth.parquet").exists():
        synthesize(heldout, samples=1000, shards=1, seed=2000 + seed, fractions={})
    return train_dir, heldout


def with_heldout(pipe: PipelineConfig, heldout: Path) -> PipelineConfig:
    """The demo pipeline with its CLIP calibration pointed at the held-out set this demo made."""
    stages = []
    for st in pipe.stages:
        cal = st.params.get("calibrate")
        if st.name == "clip_rank" and cal:
            st = st.model_copy(update={"params": st.params | {"calibrate": cal | {"heldout": str(heldout / "*.tar")}}})
        stages.append(st)
    return pipe.model_copy(update={"stages": stages})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="curate.tools.demo")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "demo.yaml"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=str(ROOT / "demo"), help="pool, work dir and outputs go here")
    ap.add_argument("--models", default=str(ROOT / "demo" / "models"), help="the scorer's cache")
    ap.add_argument("--strict", action="store_true", help="exit 3 when a self-check fails")
    a = ap.parse_args(argv)
    setup_logging(False)
    cfg = load_run_config(a.config)
    root = Path(a.dir).resolve()
    pool = root / f"pool-v{POOL_VERSION}-{a.samples}x{a.shards}-seed{a.seed}"
    if not (pool / "ground_truth.parquet").exists():
        synthesize(pool, samples=a.samples, shards=a.shards, seed=a.seed)
    models = Path(a.models).resolve()
    scorer = ensure_scorer(models, a.seed)
    _, heldout = demo_sets(a.seed)
    cfg = cfg.model_copy(update={"input": str(pool / "*.tar"), "workdir": str(root / "work"),
                                 "model_cache": str(models)})
    summary = run_pipeline(with_heldout(load_pipeline(a.pipeline), heldout), cfg)
    print(f"\n== scorer ==\n{scorer.name} sha256 {file_sha256(scorer)}")
    print("\n== funnel (read back from the work dir's stats) ==")
    print(format_funnel(funnel(summary.workdir)))
    print("\n== per ground-truth label (ground_truth.parquet): share removed by the filters, by balancing, kept ==")
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True, float_precision=3):
        print(defect_table(Path(summary.workdir), pool / "ground_truth.parquet"))
    glob = global_summaries(summary.workdir)
    if glob:
        print("\n" + format_globals(glob, summary.workdir))
    if not summary.ok:
        print("\n".join(summary.problems()), file=sys.stderr)
        return 1
    checks = self_check(Path(summary.workdir), pool / "ground_truth.parquet")
    print("\n== self-check against the ground truth ==\n" + format_checks(checks))
    out = root / "out"
    with make_executor(cfg) as ex:
        manifest = export(summary.workdir, out, ex, ExportSpec(shard_size=1000, shuffle_seed=a.seed,
                                                               overwrite=True))
    report = write_report(summary.workdir)
    print(f"\n== outputs ==\nwork dir:  {summary.workdir}\n"
          f"stats:     {summary.workdir}/stats/<stage>/<shard>.parquet (curate stats {summary.workdir})\n"
          f"curated:   {out}/metadata/*.parquet, {out}/shards/*.tar ({manifest['samples_kept']} samples in "
          f"{manifest['output_shards']} shards), {out}/uids.npy, {out}/manifest.json\n"
          f"report:    {report}")
    return 3 if a.strict and not all(ok for _, ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
