"""`make compare`: DataComp's test of a curation, at the size this machine allows.

The same tiny CLIP, the same number of training steps and seed, trained on the output of each
recipe over the demo pool, evaluated on the held-out clean split (curate.tools.evaluation): zero-shot
balanced accuracy on four tasks, retrieval R@1, match AUC. Writes ``demo/report/compare.md`` (a table like DataComp's Table 3).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from curate.core.logs import setup_logging
from curate.core.config import PipelineConfig, RunConfig, StageSpec, load_run_config
from curate.runner.registry import load_pipeline
from curate.tools.demo import ROOT, ensure_scorer, with_heldout
from curate.engine import make_executor
from curate.report.export import ExportSpec, export
from curate.runner.pipeline import run_pipeline
from curate.tools.synth import POOL_VERSION, SYNTH_VERSION, synthesize
from curate.tools.evaluation import evaluate_clip
from curate.tools.quality_head import train_quality_head
from curate.tools.training import TrainSpec, train_clip

log = logging.getLogger("curate.tools.compare")


SECOND_SCORER = "curate-tiny-synth-v2-seed1"


def recipes(heldout: Path, models: Path) -> dict[str, PipelineConfig]:
    """Every compared recipe on the demo pool, with the demo's tiny CLIP as the scorer. The models
    some recipes name (a second scorer, the quality head) are made by ``prepare`` when chosen."""
    demo = with_heldout(load_pipeline(ROOT / "pipelines" / "demo.yaml"), heldout)
    clip = next(s for s in demo.stages if s.name == "clip_score")
    scored = StageSpec(name="clip_score", params=dict(clip.params, all_rows=True))
    basic = load_pipeline(ROOT / "pipelines" / "datacomp_basic.yaml")
    return {
        "no_filter": load_pipeline(ROOT / "pipelines" / "no_filter.yaml"),
        "datacomp_basic": basic,
        "clip_score_top30": PipelineConfig(name="clip_score_top30", stages=[
            scored, StageSpec(name="clip_rank", params={"top_fraction": 0.3})]),
        "negclip_top30": PipelineConfig(name="negclip_top30", stages=[
            scored,
            StageSpec(name="clip_loss", params={"all_rows": True}),
            StageSpec(name="clip_rank", params={"scores_from": "clip_loss", "score_column": "negclip_loss",
                                                "top_fraction": 0.3})]),
        "ensemble_top30": ensemble_recipe(clip.params),
        "classifier": classifier_recipe(demo),
        "tmars_top30": with_scorer(load_pipeline(ROOT / "pipelines" / "tmars.yaml"), clip.params),
        "nsfw": load_pipeline(ROOT / "pipelines" / "nsfw.yaml"),
        "quality_head": PipelineConfig(name="quality_head", stages=[
            scored, StageSpec(name="embedding_head", id="quality", params={
                "checkpoint": str(models / "quality_head" / "quality_head.pt"), "output": "sigmoid",
                "min_score": 0.5})]),
        "caption_dedup": PipelineConfig(name="caption_dedup", stages=[
            *basic.stages, StageSpec(name="dedup", params={"exact": [], "phash_radius": None,
                                                           "caption_jaccard": 0.85})]),
        **metaclip_recipes(),
        "recaption_rescue": rescue_recipe(scored, models),
        "full": demo,
    }


def rescue_recipe(scored: StageSpec, models: Path) -> PipelineConfig:
    """clip_score_top30 whose drops are rescued by the tiny CoCa's captions (pipelines/
    recaption_rescue.yaml on the demo's scorer; the export writes a rescued pair's synthetic
    caption); the image rules stay out, as in clip_score_top30, so the two rows differ by the
    rescue alone."""
    from curate.tools.captioning import CAPTIONER, MODEL

    real = load_pipeline(ROOT / "pipelines" / "recaption_rescue.yaml")
    stages = []
    for s in real.stages:
        if s.name == "clip_score":
            s = s.model_copy(update={"params": s.params | scored.params | {"store_embeddings": False}})
        elif s.name == "recaption":
            s = s.model_copy(update={"params": s.params | {"model": MODEL, "pretrained": str(models / f"{CAPTIONER}.pt"),
                                                           "max_new_tokens": 16, "batch_size": 64, "all_rows": True}})
        if s.name != "image":
            stages.append(s)
    return real.model_copy(update={"name": "recaption_rescue", "stages": stages})


def ensemble_recipe(scorer: dict) -> PipelineConfig:
    """pipelines/ensemble_b32_l14.yaml with two tiny CLIPs (trained with different seeds) as its
    two scorers: their pool-wide ranks averaged, top 30 % kept."""
    real = load_pipeline(ROOT / "pipelines" / "ensemble_b32_l14.yaml")
    first, second = (s.id for s in real.stages if s.name == "clip_score")
    weights = {first: scorer["pretrained"], second: f"{SECOND_SCORER}.pt"}
    stages = [s.model_copy(update={"params": s.params | {k: scorer[k] for k in ("model", "batch_size")}
                                   | {"pretrained": weights[s.id]}})
              if s.name == "clip_score" else s for s in real.stages]
    return real.model_copy(update={"name": "ensemble_top30", "stages": stages})


def metaclip_recipes() -> dict[str, PipelineConfig]:
    """pipelines/metaclip2_multilingual.yaml (every language kept, concepts balanced per language)
    and the same recipe English-only, with the pool's shape words in every language it writes as
    the vocabulary and the cap solved for 2,000 samples (the demo's balancing budget)."""
    real = load_pipeline(ROOT / "pipelines" / "metaclip2_multilingual.yaml")
    vocab = str(ROOT / "pipelines" / "vocab" / "synthetic_shapes_multilingual.txt")

    def variant(name: str, multilingual: bool) -> PipelineConfig:
        stages = []
        for s in real.stages:
            if s.name == "balance":
                params = {k: v for k, v in s.params.items() if k != "t"}
                s = s.model_copy(update={"params": params | {"vocabulary": vocab, "target_size": 2000,
                                                             "per_language": multilingual}})
            elif s.name == "text" and not multilingual:
                s = s.model_copy(update={"params": s.params | {"languages": ["en"]}})
            stages.append(s)
        return real.model_copy(update={"name": name, "stages": stages})

    return {"metaclip_en": variant("metaclip_en", False),
            "metaclip2_multilingual": variant("metaclip2_multilingual", True)}


def prepare(name: str, models: Path, cfg: RunConfig, scorer: dict) -> None:
    """Make the models a chosen recipe names: the ensemble's second scorer, the quality head."""
    if name == "ensemble_top30":
        ensure_scorer(models, 0, name=SECOND_SCORER, train_seed=1)
    elif name == "quality_head":
        train_quality_head(models / "quality_head", cfg, scorer)
    elif name == "recaption_rescue":
        from curate.tools.captioning import ensure_captioner

        ensure_captioner(models)


def with_scorer(pipe: PipelineConfig, scorer: dict) -> PipelineConfig:
    """``pipe`` with the demo's tiny CLIP in place of its scorer's model (the recipe's other
    clip_score parameters, such as T-MARS's ``mask_text_from``, stay)."""
    stages = [s.model_copy(update={"params": s.params | {k: scorer[k] for k in ("model", "pretrained", "batch_size")}})
              if s.name == "clip_score" else s for s in pipe.stages]
    return pipe.model_copy(update={"stages": stages})


def classifier_recipe(demo: PipelineConfig) -> PipelineConfig:
    """pipelines/classifier_filter.yaml on the demo pool: the demo's caption and image filters and
    tiny CLIP, and a classifier over the pool's colours (the tiny CLIP tells colours apart; its
    shape zero-shot accuracy is near chance), prompted as the evaluation prompts colours."""
    from curate.tools.evaluation import zero_shot_tasks

    real = load_pipeline(ROOT / "pipelines" / "classifier_filter.yaml")
    cls = next(s for s in real.stages if s.name == "classifier")
    params = cls.params | {"vocabulary": str(ROOT / "pipelines" / "vocab" / "synthetic_colours.txt"),
                           "templates": list(zero_shot_tasks()["colour"].templates), "top_k": 1}
    return PipelineConfig(name="classifier", stages=[
        *(s for s in demo.stages if s.name in ("text", "image", "clip_score")),
        cls.model_copy(update={"params": params})])


TASKS = ("shape", "colour", "count", "position")


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over seeds (half-width inf for one seed)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("-inf"), float("inf")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def verdicts(rows: list[dict], metric: str = "zeroshot_mean", baseline: str = "no_filter") -> list[dict]:
    """Per recipe: mean and 95 % interval of ``metric`` over seeds, and whether it beats the baseline.
    Seeds are paired (the same seed trains every recipe with the same data order rule), so the
    decision uses the interval of the per-seed difference: above 0 "yes", below 0 "no", else
    "undecided" (more seeds or steps needed)."""
    by = {}
    for r in rows:
        by.setdefault(r["recipe"], {})[r["seed"]] = r[metric]
    base = by.get(baseline, {})
    out = []
    for name, seeds in by.items():
        mean, lo, hi = interval(list(seeds.values()))
        row = {"recipe": name, "seeds": len(seeds), "mean": mean, "lo": lo, "hi": hi, "beats_baseline": None}
        common = sorted(set(seeds) & set(base))
        if name != baseline and common:
            dmean, dlo, dhi = interval([seeds[k] - base[k] for k in common])
            row.update(diff_mean=dmean, diff_lo=dlo, diff_hi=dhi,
                       beats_baseline="yes" if dlo > 0 else "no" if dhi < 0 else "undecided")
        out.append(row)
    return out


def format_table(rows: list[dict], epochs: int, samples_per_epoch: int, seeds: list[int]) -> str:
    """Markdown like DataComp's Table 3: one row per recipe and seed, then means with 95 % intervals
    over seeds and whether each curated recipe beats no_filter."""
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
             f"long-tailed). Chance: {chance}. Training is deterministic: a seed reproduces its row.", "",
             head, rule]
    lines += [line(r, str(r["seed"])) for r in rows]
    lines += ["", "Zero-shot mean over seeds, 95 % t-interval; \"beats no_filter\" from the interval of the "
              "per-seed difference (paired by seed):", "",
              "| recipe | seeds | mean | 95 % interval | beats no_filter | difference interval |",
              "|---|---:|---:|---|---|---|"]
    for v in verdicts(rows):
        diff = f"[{v['diff_lo']:+.3f}, {v['diff_hi']:+.3f}]" if "diff_lo" in v else "-"
        lines.append(f"| {v['recipe']} | {v['seeds']} | {v['mean']:.3f} | [{v['lo']:.3f}, {v['hi']:.3f}] | "
                     f"{v['beats_baseline'] or '-'} | {diff} |")
    lines += ["", "Per task (one task's noise can hide another's effect in the mean): \"beats no_filter\" "
              "and the mean difference from no_filter over the seeds:", "",
              "| recipe | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    by_task = {t: {v["recipe"]: v for v in verdicts(rows, f"zeroshot_{t}")} for t in TASKS}
    base = by_task[TASKS[0]].get("no_filter")
    for name in (v["recipe"] for v in verdicts(rows)):
        if base is None or name == "no_filter":
            continue
        cells = []
        for t in TASKS:
            v = by_task[t][name]
            if v["beats_baseline"] is None:
                cells.append("-")
            else:
                cells.append(f"{v['beats_baseline']} ({v['diff_mean']:+.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    undecided = [v["recipe"] for v in verdicts(rows) if v["beats_baseline"] == "undecided"]
    lines += ["", ("Ranking decided: every curated recipe's difference interval excludes 0." if not undecided else
                   f"Not decided for {', '.join(undecided)}: the budget ({len(seeds)} seed(s)) is too small; "
                   "add seeds (`ARGS=\"--seeds 0 1 2 3 4\"`) or steps (`--epochs`).")]
    return "\n".join(lines) + "\n"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no usable torch build: CPU budget
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="curate.tools.compare")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (the pool is seed 0)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 3 on CPU, 10 on a GPU")
    ap.add_argument("--samples-per-epoch", type=int, default=None, help="default: 4096 on CPU, 16384 on a GPU")
    ap.add_argument("--recipes", nargs="+", default=None, help="a subset of the recipes (no_filter, the "
                    "baseline, is always run)")
    a = ap.parse_args(argv)
    gpu = _cuda_available()
    a.epochs = a.epochs or (10 if gpu else 3)
    a.samples_per_epoch = a.samples_per_epoch or (16384 if gpu else 4096)
    setup_logging(False)
    models = ROOT / "demo" / "models"
    ensure_scorer(models, 0)
    scorer = next(s for s in load_pipeline(ROOT / "pipelines" / "demo.yaml").stages if s.name == "clip_score").params
    pool = ROOT / "demo" / f"pool-v{POOL_VERSION}-5000x10-seed0"
    heldout = ROOT / "demo" / f"heldout-v{SYNTH_VERSION}"
    if not (pool / "ground_truth.parquet").exists():
        synthesize(pool, samples=5000, shards=10, seed=0)
    base = load_run_config(ROOT / "configs" / "demo.yaml")
    chosen = recipes(heldout, models)
    unknown = sorted(set(a.recipes or []) - set(chosen))
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; known: {', '.join(chosen)}")
    if a.recipes:
        chosen = {k: v for k, v in chosen.items() if k == "no_filter" or k in a.recipes}
    rows = []
    for name, pipe in chosen.items():
        d = ROOT / "demo" / "compare" / name
        cfg = base.model_copy(update={"input": str(pool / "*.tar"), "workdir": str(d / "work"),
                                      "model_cache": str(models)})
        prepare(name, models, cfg, scorer)
        s = run_pipeline(pipe, cfg)
        if not s.ok:
            log.error("%s: %s", name, s.problems())
            return 1
        with make_executor(cfg) as ex:
            # compare owns demo/compare/<recipe>/out: a rerun replaces its earlier export
            m = export(d / "work", d / "out", ex, ExportSpec(shard_size=500, write_pool=False, overwrite=True))
        for seed in a.seeds:
            spec = TrainSpec(epochs=a.epochs, seed=seed, samples_per_epoch=a.samples_per_epoch,
                             device="cuda" if gpu else "cpu")
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
