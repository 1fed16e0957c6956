"""What each recipe costs per sample, and DataComp's basic filter side by side.

- basic_vs_datacomp: ``pipelines/datacomp_basic.yaml`` run end to end on the shards (index + text +
  image, in-process, one core) against DataComp's own way of running its basic filter on the same
  rows' metadata (a pandas table; fastText per caption through ``DataFrame.apply``; word and
  character counts; original sizes), in the same process. Target: curate >= 0.5x DataComp's rows/s
  while also indexing the shards.
- metadata_basic_vs_datacomp: the same on a 200k-row metadata pool (no images), with fastText's
  top-1 alone over the same captions for the bound both share; target >= 3x DataComp.
- metadata_recipes: DataComp's basic, text-based and CLIP-score recipes on a 1M-row metadata pool.
- per_recipe: for every recipe in pipelines/ that runs offline (no CLIP weights): tar bytes read and
  images decoded per sample, summed over its map stages, read back from the stats files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from curate.bench.common import BENCH_DIR, ROOT, bench_pool, peak_rss_mb, save, timer
from curate.core.config import ConfigError, RunConfig
from curate.runner.registry import load_pipeline
from curate.io.shards import expand_input, iter_samples
from curate.runner.pipeline import run_pipeline

NEEDS_WEIGHTS = ("clip_score", "reference_filter")  # recipes with these stages need CLIP weights


def metadata_table(pool: Path) -> Path:
    """DataComp-style metadata of the pool (uid, text, original_width, original_height)."""
    out = pool / "metadata.parquet"
    if out.exists():
        return out
    rows = {"uid": [], "text": [], "original_width": [], "original_height": []}
    for shard in expand_input(str(pool / "*.tar")):
        for s in iter_samples(shard):
            meta = s.meta()
            rows["uid"].append(meta.get("uid") or s.key)
            rows["text"].append((s.caption_bytes() or b"").decode("utf-8", "replace"))
            rows["original_width"].append(meta.get("original_width"))
            rows["original_height"].append(meta.get("original_height"))
    pl.DataFrame(rows).write_parquet(out)
    return out


def _config(pool: Path, work: Path) -> RunConfig:
    return RunConfig.model_validate({"input": str(pool / "*.tar"), "workdir": str(work),
                                     "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})


def basic_vs_datacomp(pool: Path, n: int) -> dict:
    meta = metadata_table(pool)
    datacomp_basic_uids(meta)  # warm: model load and page cache, as for curate below
    with timer() as td:
        kept_dc = datacomp_basic_uids(meta)
    work = BENCH_DIR / "recipes-basic"
    shutil.rmtree(work, ignore_errors=True)
    with timer() as tc:
        s = run_pipeline(load_pipeline(ROOT / "pipelines" / "datacomp_basic.yaml"), _config(pool, work))
    assert s.ok, s.problems()
    from curate.report.decisions import decisions

    d = decisions(work)
    kept = set(d.filter(pl.col("kept"))["uid"])
    # The metadata cannot know that an image is broken; the shards can: those are the only difference.
    broken = set(d.filter(pl.col("reason") == "image:undecodable")["uid"])
    dc_rate, cu_rate = n / td["seconds"], n / tc["seconds"]
    return {"samples": n, "datacomp_s": round(td["seconds"], 3), "curate_s": round(tc["seconds"], 3),
            "datacomp_rows_per_s": round(dc_rate), "curate_rows_per_s": round(cu_rate),
            "ratio_curate_over_datacomp": round(cu_rate / dc_rate, 3), "target": ">= 0.5",
            "kept_datacomp": len(kept_dc), "kept_curate": len(kept),
            "kept_by_datacomp_only_all_undecodable": kept_dc - kept == kept_dc & broken and kept <= kept_dc}


def metadata_pool(pool: Path, rows: int, shards: int = 10) -> Path:
    """A DataComp-style metadata pool of ``rows`` rows: the bench pool's metadata repeated with fresh
    uids and a seeded ViT-L/14 score column; ``all.parquet`` (one table) beside ``pool/``."""
    folder = BENCH_DIR / f"metadata-{rows}"
    if (folder / "all.parquet").exists():
        return folder
    base = pl.read_parquet(metadata_table(pool))
    reps = -(-rows // base.height)
    big = pl.concat([base] * reps).head(rows).with_columns(
        pl.Series("uid", [f"{i:032x}" for i in range(rows)]),
        pl.Series("clip_l14_similarity_score", np.random.default_rng(0).uniform(0.05, 0.45, rows).astype(np.float32)))
    (folder / "pool").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(rows), shards)):
        big[part.tolist()].write_parquet(folder / "pool" / f"{k:05d}.parquet")
    big.write_parquet(folder / "all.parquet")  # last: marks the folder complete
    return folder


def _run_metadata_recipe(folder: Path, recipe: str) -> tuple[float, set[str]]:
    from curate.report.decisions import decisions

    work = BENCH_DIR / f"recipes-metadata-{recipe}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = RunConfig.model_validate({"input": str(folder / "pool" / "*.parquet"), "workdir": str(work),
                                    "executor": {"kind": "inprocess", "retries": 0}, "device": "cpu"})
    with timer() as t:
        s = run_pipeline(load_pipeline(ROOT / "pipelines" / f"{recipe}.yaml"), cfg)
    assert s.ok, s.problems()
    return t["seconds"], set(decisions(work).filter(pl.col("kept"))["uid"])


def metadata_basic_vs_datacomp(pool: Path, rows: int) -> dict:
    """DataComp basic on a metadata pool (no images): curate's parity recipe (index from Parquet +
    text + size rules, in-process, one core) against DataComp's own computation of the same uid set,
    in the same process; and fastText's top-1 prediction alone over the same captions, which both
    must make once per row and which bounds both rates."""
    folder = metadata_pool(pool, rows)
    datacomp_basic_uids(folder / "all.parquet")  # warm: model load and page cache
    with timer() as td:
        expect = datacomp_basic_uids(folder / "all.parquet")
    seconds, kept = _run_metadata_recipe(folder, "datacomp_basic")
    from curate.models.langid import load_langid

    texts = [t.replace("\n", " ") + "\n" for t in pl.read_parquet(folder / "all.parquet", columns=["text"])["text"]]
    predict = load_langid().f.predict
    with timer() as tf:
        for t in texts:
            predict(t, 1, 0.0, "replace")
    dc_rate, cu_rate, ft_rate = rows / td["seconds"], rows / seconds, rows / tf["seconds"]
    return {"rows": rows, "datacomp_s": round(td["seconds"], 2), "curate_s": round(seconds, 2),
            "datacomp_rows_per_s": round(dc_rate), "curate_rows_per_s": round(cu_rate),
            "fasttext_top1_alone_rows_per_s": round(ft_rate),
            "ratio_curate_over_datacomp": round(cu_rate / dc_rate, 3), "target": ">= 1.5",
            "same_uids": kept == expect, "kept": len(kept)}


def metadata_recipes(pool: Path, rows: int) -> dict:
    """DataComp's basic, text-based and CLIP-score parity recipes on a metadata pool of ``rows`` rows,
    no image anywhere: seconds, rows/s (one core, in-process) and rows kept; the CLIP-score uids
    checked against DataComp's computation."""
    folder = metadata_pool(pool, rows)
    out: dict = {"rows": rows}
    for recipe in ("datacomp_basic", "datacomp_text_based", "datacomp_clip_score_metadata"):
        seconds, kept = _run_metadata_recipe(folder, recipe)
        out[recipe] = {"seconds": round(seconds, 1), "rows_per_s": round(rows / seconds), "kept": len(kept)}
        if recipe == "datacomp_clip_score_metadata":
            out[recipe]["same_uids_as_datacomp"] = kept == datacomp_clip_score_uids(
                folder / "all.parquet", "clip_l14_similarity_score", 0.3)
    out["peak_rss_mb"] = round(peak_rss_mb())
    return out


def per_recipe(pool: Path, n: int) -> dict:
    out = {}
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        pipe = load_pipeline(path)
        if any(st.name in NEEDS_WEIGHTS for st in pipe.stages):
            out[path.stem] = "needs CLIP weights (not measured offline)"
            continue
        work = BENCH_DIR / f"recipes-{path.stem}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            with timer() as t:
                s = run_pipeline(pipe, _config(pool, work))
        except ConfigError as e:  # needs files this machine does not have (target sets, heads)
            out[path.stem] = "not run: " + " ".join(str(e).split("\n")[1:]).strip()
            continue
        if not s.ok:  # a recipe for another kind of pool (metadata tables)
            out[path.stem] = "not run: " + "; ".join(s.problems())[:200]
            continue
        stats = pl.read_parquet(work / "stats" / "**" / "*.parquet")
        sums = dict(stats.group_by("metric").agg(pl.col("value").sum()).iter_rows())
        shard_bytes = sum(Path(p).stat().st_size for p in expand_input(str(pool / "*.tar")))
        out[path.stem] = {"seconds": round(t["seconds"], 2),
                          "tar_bytes_read_per_shard_byte": round(sums.get("bytes_read", 0) / shard_bytes, 2),
                          "images_decoded_per_sample": round(sums.get("count:images_decoded", 0) / n, 3)}
    return out


def run() -> dict:
    pool = bench_pool(10000, 10, seed=3)
    n = int(pl.read_parquet(pool / "ground_truth.parquet").height)
    res = {"basic_vs_datacomp": basic_vs_datacomp(pool, n),
           "metadata_basic_vs_datacomp": metadata_basic_vs_datacomp(pool, 200_000),
           "metadata_recipes": metadata_recipes(pool, 1_000_000),
           "per_recipe": per_recipe(pool, n)}
    save("recipes", res)
    print(json.dumps(res["basic_vs_datacomp"]))
    print(json.dumps(res["metadata_basic_vs_datacomp"]))
    print(json.dumps(res["metadata_recipes"]))
    return res


def datacomp_basic_uids(metadata: Path) -> set[str]:
    """The uids DataComp's basic filter keeps, computed its way (the oracle of the parity test)."""
    import pandas as pd

    from curate.models.langid import load_langid

    model = load_langid()
    df = pd.read_parquet(metadata)
    lang = df.text.apply(lambda t: model.predict(t.replace("\n", " "))[0][0].split("__label__")[1])
    words = df.text.apply(lambda t: len(t.split()))
    chars = df.text.apply(len)
    w, h = df.original_width, df.original_height
    aspect = np.maximum(w, h) / np.minimum(w, h)
    mask = (lang == "en") & (words > 2) & (chars > 5) & (np.minimum(w, h) >= 200) & (aspect <= 3.0)
    return set(df.uid[mask])


def datacomp_text_based_uids(metadata: Path, contains_concept: dict[str, bool]) -> set[str]:
    """The uids DataComp's text-based filter keeps: fastText top-1 English on the raw caption, and
    ``contains_concept[caption]`` (whether a token's first WordNet sense is an ImageNet-21k synset,
    computed by NLTK and stored with the test fixture: NLTK's WordNet is not a dependency)."""
    import pandas as pd

    from curate.models.langid import load_langid

    model = load_langid()
    df = pd.read_parquet(metadata)
    lang = df.text.apply(lambda t: model.predict(t.replace("\n", " "))[0][0].split("__label__")[1])
    return set(df.uid[(lang == "en") & df.text.map(contains_concept)])


def datacomp_clip_score_uids(metadata: Path, column: str, fraction: float) -> set[str]:
    """The uids DataComp's CLIP-score baseline keeps: the score at index floor(n * f) of the scores
    sorted descending is the threshold, every score >= it is kept."""
    import pandas as pd

    df = pd.read_parquet(metadata)
    scores = df[column].to_numpy()
    threshold = -np.sort(-scores)[int(np.floor(len(scores) * fraction))]
    return set(df.uid[scores >= threshold])
