"""`make compare`: DataComp's test of a curation, at the size this machine allows.

The same tiny CLIP, the same number of training steps and seed, trained on the output of each
recipe over the demo pool, evaluated on the held-out clean split (curate.evaluation): zero-shot
balanced accuracy on four tasks, retrieval R@1, match AUC. Writes ``demo/report/compare.md`` (a table like DataComp's Table 3).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from curate.cli import _setup_logging
from curate.config import PipelineConfig, StageSpec, load_pipeline, load_run_config
from curate.demo import ROOT, ensure_scorer
from curate.engine import make_executor
from curate.export import ExportSpec, export
from curate.pipeline import run_pipeline
from curate.synth import SYNTH_VERSION, synthesize
from curate.evaluation import evaluate_clip
from curate.training import TrainSpec, train_clip

log = logging.getLogger("curate.compare")


def recipes() -> dict[str, PipelineConfig]:
    demo = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    clip = next(s for s in demo.stages if s.name == "clip_score")
    return {
        "no_filter": load_pipeline(ROOT / "pipelines" / "no_filter.yaml"),
        "datacomp_basic": load_pipeline(ROOT / "pipelines" / "datacomp_basic.yaml"),
        "clip_score_top30": PipelineConfig(name="clip_score_top30", stages=[
            StageSpec(name="clip_score", params=dict(clip.params, all_rows=True)),
            StageSpec(name="clip_rank", params={"top_fraction": 0.3})]),
        "full": demo,
    }


TASKS = ("shape", "colour", "count", "position")


def format_table(rows: list[dict], epochs: int, samples_per_epoch: int, seeds: list[int]) -> str:
    """Markdown like DataComp's Table 3: one row per recipe and seed, then means over seeds."""
    head = ("| recipe | seed | samples kept | zero-shot mean | " + " | ".join(TASKS)
            + " | retrieval i2t R@1 | retrieval t2i R@1 | match AUC |")
    rule = "|---|---:|---:|---:|" + "---:|" * len(TASKS) + "---:|---:|---:|"

    def line(r: dict, seed: str) -> str:
        vals = [r["zeroshot_mean"], *[r[f"zeroshot_{t}"] for t in TASKS], r["retrieval_i2t_r1"],
                r["retrieval_t2i_r1"], r["match_vs_shuffled_auc"]]
        return f"| {r['recipe']} | {seed} | {r['samples_kept']} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"

    chance = " ".join(f"{t} {rows[0][f'chance_{t}']:.3f}," for t in TASKS).rstrip(",") if rows else ""
    lines = [f"# Curation comparison (tiny CLIP, {epochs} x {samples_per_epoch} samples seen, seeds {seeds})", "",
             f"Evaluated on the held-out clean synthetic split ({rows[0]['samples'] if rows else 0} pairs). "
             "Zero-shot scores are balanced accuracy (mean per-class recall; the pool's concepts are "
             f"long-tailed). Chance: {chance}.", "", head, rule]
    lines += [line(r, str(r["seed"])) for r in rows]
    if len(seeds) > 1:
        lines += ["", "Mean over seeds:", "", head, rule]
        for name in dict.fromkeys(r["recipe"] for r in rows):
            mine = [r for r in rows if r["recipe"] == name]
            mean = {k: (sum(r[k] for r in mine) / len(mine) if isinstance(mine[0][k], float) else mine[0][k])
                    for k in mine[0]}
            lines.append(line(mean, "mean"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="curate.compare")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the pool is seed 0)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples-per-epoch", type=int, default=4096)
    a = ap.parse_args(argv)
    _setup_logging(False)
    models = ROOT / "demo" / "models"
    ensure_scorer(models, 0)
    pool = ROOT / "demo" / f"pool-v{SYNTH_VERSION}"
    heldout = ROOT / "demo" / f"heldout-v{SYNTH_VERSION}"
    if not (pool / "ground_truth.parquet").exists():
        synthesize(pool, samples=5000, shards=10, seed=0)
    base = load_run_config(ROOT / "configs" / "demo.yaml")
    rows = []
    for name, pipe in recipes().items():
        d = ROOT / "demo" / "compare" / name
        cfg = base.model_copy(update={"input": str(pool / "*.tar"), "workdir": str(d / "work"),
                                      "model_cache": str(models)})
        s = run_pipeline(pipe, cfg)
        if not s.ok:
            log.error("%s: %s", name, s.problems())
            return 1
        with make_executor(cfg) as ex:
            m = export(d / "work", d / "out", ex, ExportSpec(shard_size=500, write_pool=False))
        for seed in a.seeds:
            spec = TrainSpec(epochs=a.epochs, seed=seed, samples_per_epoch=a.samples_per_epoch)
            tag = name if seed == 0 else f"{name}-seed{seed}"
            ckpt = train_clip(str(d / "out" / "shards" / "*.tar"), d / "model", spec, name=tag)
            ev = evaluate_clip("curate-tiny", str(ckpt), heldout, seed=0)
            rows.append({"recipe": name, "seed": seed, "samples_kept": m["samples_kept"], **ev})
            log.info("%s seed %d: %s", name, seed, rows[-1])
    out = ROOT / "demo" / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = format_table(rows, a.epochs, a.samples_per_epoch, a.seeds)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
