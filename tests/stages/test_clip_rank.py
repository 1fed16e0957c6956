"""clip_rank's thresholds over score partials: exact top fraction with uid tie-breaks, the
two-pass k-th score, the histogram approximation within its recorded bounds, and its params."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract.base import GlobalContext, RunInfo
from curate.stages.clip_rank import ClipRankStage, kth_ranked, ranks_in


def _rank_with_partials(tmp_path: Path, parts: list[list[tuple[str, float]]], **params) -> dict:
    st = ClipRankStage(ClipRankStage.Params(**params))
    run = RunInfo(run_id="t", workdir=str(tmp_path))
    ctx = GlobalContext(stage_id="clip_rank", shards=[f"s{i}" for i in range(len(parts))], run=run)
    for path, rows in zip(ctx.partials(), parts):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"uid": [u for u, _ in rows], "clip_score": pa.array([s for _, s in rows], pa.float32())}), path)
    return st.combine(ctx)


def test_top_fraction_exact_with_ties(tmp_path: Path):
    rows = [(f"{i:032x}", 0.5) for i in range(10)] + [(f"{100 + i:032x}", 0.9) for i in range(2)] + \
           [(f"{200 + i:032x}", 0.1) for i in range(8)]
    art = _rank_with_partials(tmp_path, [rows[:7], rows[7:]], top_fraction=0.25)
    assert art["k"] == 5 and art["threshold"] == pytest.approx(0.5)
    kept = [u for u, s in rows if ranks_in(np.float32(s), u, art["threshold"], art["tie_uid"])]
    assert len(kept) == 5
    assert sorted(kept)[:3] == [f"{i:032x}" for i in range(3)]  # ties broken by smallest uid
    assert (tmp_path / "global" / "clip_rank_histogram.parquet").exists()


def test_approximate_threshold_within_documented_bound(tmp_path: Path):
    rng = np.random.default_rng(0)
    scores = rng.normal(0.25, 0.05, 5000).astype(np.float32)
    rows = [(f"{i:032x}", float(s)) for i, s in enumerate(scores)]
    art = _rank_with_partials(tmp_path, [rows], top_fraction=0.3, exact_max_rows=10)
    assert not art["exact"]
    kept = int((scores >= art["threshold"]).sum())
    assert abs(kept - art["k"]) <= art["count_error_bound"]
    exact = np.sort(scores)[::-1][art["k"] - 1]
    assert abs(exact - art["threshold"]) <= art["score_error_bound"]


def test_rank_params_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ClipRankStage.Params(top_fraction=0.3, min_score=0.2)
    with pytest.raises(ValidationError):
        ClipRankStage.Params()


@pytest.mark.parametrize("bins", [16, 65536])
def test_kth_ranked_equals_a_full_sort(tmp_path: Path, bins: int):
    """The two-pass threshold equals sorting every (score, uid): ties, repeated scores, NaN, scores
    outside [-1, 1], k at both ends, several files."""
    rng = np.random.default_rng(bins)
    n = 3000
    scores = np.round(rng.normal(0.25, 0.1, n), 3)  # many exact ties
    scores[:40] = np.nan
    scores[40:45] = [1.0, -1.0, 1.5, -3.0, 0.25]
    uids = np.array([f"{x:032x}" for x in rng.permutation(n)])
    paths = []
    for k, part in enumerate(np.array_split(rng.permutation(n), 5)):
        p = tmp_path / f"{k}.parquet"
        pq.write_table(pa.table({"uid": uids[part].tolist(), "clip_score": scores[part]}), p)
        paths.append(p)
    order = np.lexsort((uids, -scores))
    for k in (1, 2, 17, 900, n - 41, n - 40, n - 39, n):
        s, u = kth_ranked(paths, k, bins)
        want = order[k - 1]
        assert u == uids[want] and (s == scores[want] or (np.isnan(s) and np.isnan(scores[want]))), k


def test_a_second_score_rescues_rows_below_the_threshold(tmp_path: Path):
    """A metadata pool with two scores per row: the threshold comes from the first alone (top 30 %
    of 10 rows: the 3 best); a row below it is kept, marked rescued, when its second score reaches
    the threshold; a missing second score rescues nothing."""
    import polars as pl

    from curate.runner.pipeline import run_pipeline
    from tests.conftest import make_config, make_pipeline

    first = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    second = [0.1, 0.1, 0.1, 0.75, 0.69, None, 0.71, 0.1, 0.1, float("nan")]
    pool = tmp_path / "meta"
    pool.mkdir()
    pl.DataFrame({"uid": [f"{i:032x}" for i in range(10)], "text": [f"caption {i}" for i in range(10)],
                  "clip_l14_similarity_score": first, "clip_b32_similarity_score": second}
                 ).write_parquet(pool / "00000.parquet")
    params = {"scores_from": "index", "score_column": "clip_l14_similarity_score", "top_fraction": 0.3}
    rescue = params | {"rescue_from": "index", "rescue_column": "clip_b32_similarity_score"}
    for name, p in (("plain", params), ("rescue", rescue)):
        s = run_pipeline(make_pipeline(("clip_rank", p)), make_config(str(pool / "*.parquet"), tmp_path / name))
        assert s.ok, s.problems()
    plain = pl.read_parquet(tmp_path / "plain" / "clip_rank" / "*.parquet").sort("uid")
    res = pl.read_parquet(tmp_path / "rescue" / "clip_rank" / "*.parquet").sort("uid")
    assert plain["keep_clip_rank"].to_list() == [True] * 3 + [False] * 7 and "rescued" not in plain.columns
    assert res["keep_clip_rank"].to_list() == [True, True, True, True, False, False, True, False, False, False]
    assert res["rescued"].to_list() == [False, False, False, True, False, False, True, False, False, False]
    assert res["reason_clip_rank"].to_list()[4] == "clip:below_threshold"
