"""Global stages at pool scale without images (``make bench-scale N=...``).

For each N, synthesises the partials that the map side of the global stages would have written
(one Parquet per shard of ``shard_rows`` rows): uids; for ``dedup`` sha256 with planted exact
copies, 64-bit pHashes with planted near-copies (1-3 bits flipped), caption and URL hashes, CLIP
scores; for ``clip_rank`` the scores; for ``balance`` concept ids drawn head-heavy (Zipf) from the
ImageNet-21k vocabulary. Then runs each stage's real ``combine`` in its own process (so its peak
memory, VmHWM, is its own): seconds, peak RSS, disk used, and for dedup the recall of the planted
copies (both rows of a planted pair in one duplicate group). ``dedup_partitioned`` is the same
dedup split over PARTS combine tasks (``partitions``), each in its own process, then the final
combine over their edge lists.

    python -m curate.bench.scale 1280000 12800000
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.bench.common import BENCH_DIR, ROOT, save
from curate.io.layout import WorkDir
from curate.io.parquet import write_table

STAGES = {
    "dedup": {"exact": ["image"], "phash_radius": 4, "keep": "clip_score"},
    "clip_rank": {"top_fraction": 0.3},
    # MetaCLIP's t = 20k at 400M pairs, scaled to the pool
    "balance": {"vocabulary": "imagenet21k", "unmatched": "keep"},
}
EXACT_SHARE, NEAR_SHARE = 0.03, 0.03  # planted copies
PARTS = 4  # the partitioned dedup row: its parts run one after another here, each in its own process


def _hex(values: np.ndarray, width: int) -> list[str]:
    return [f"{v:0{width}x}" for v in values.tolist()]


def synthesise(n: int, shard_rows: int, root: Path, seed: int = 0) -> dict:
    """Partials for every stage in STAGES under ``root`` (a work dir); planted pairs saved beside."""
    rng = np.random.default_rng(seed)
    work = WorkDir.at(str(root))
    idx = np.arange(n, dtype=np.uint64)
    sha_a = rng.integers(0, 2**63, n, dtype=np.int64)
    phash = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    copies = rng.permutation(n)[: int(n * (EXACT_SHARE + NEAR_SHARE))]
    exact_c, near_c = copies[: int(n * EXACT_SHARE)], copies[int(n * EXACT_SHARE):]
    originals = np.setdiff1d(np.arange(n), copies)  # a copy's source is never itself a copy
    exact_src = originals[rng.integers(0, len(originals), len(exact_c))]
    near_src = originals[rng.integers(0, len(originals), len(near_c))]
    sha_a[exact_c] = sha_a[exact_src]
    phash[exact_c] = phash[exact_src]
    flips = np.zeros(len(near_c), dtype=np.int64)
    for k in range(3):  # 1-3 distinct bits (a repeated bit cancels: at most 3 in all)
        bit = rng.integers(0, 64, len(near_c)).astype(np.int64)
        use = rng.random(len(near_c)) < (1.0 if k == 0 else 0.5)
        flips ^= np.where(use, np.left_shift(np.int64(1), bit), 0)
    phash[near_c] = phash[near_src] ^ flips
    scores = np.clip(rng.normal(0.28, 0.06, n), -1, 1)
    vocab_size = 21_000
    n_concepts = rng.integers(0, 4, n)
    concepts = (rng.zipf(1.25, int(n_concepts.sum())) - 1) % vocab_size
    offsets = np.concatenate([[0], np.cumsum(n_concepts)]).astype(np.int32)
    shards = []
    for s, start in enumerate(range(0, n, shard_rows)):
        stop = min(n, start + shard_rows)
        name = f"{s:06d}"
        shards.append(name)
        uid = pa.array(_hex(idx[start:stop] * np.uint64(2654435761) % np.uint64(2**61 - 1), 32))
        nulls = pa.nulls(stop - start)
        dedup = pa.table({"uid": uid, "sha256": _hex(sha_a[start:stop].view(np.uint64), 64),
                          "caption_h": rng.integers(-2**63, 2**63 - 1, stop - start, dtype=np.int64),
                          "url_h": rng.integers(-2**63, 2**63 - 1, stop - start, dtype=np.int64),
                          "phash": phash[start:stop], "clip_score": scores[start:stop].astype(np.float32),
                          "phash_crops": nulls.cast(pa.list_(pa.int64())),
                          "color_sig": nulls.cast(pa.list_(pa.uint8())),
                          "caption_mh": nulls.cast(pa.list_(pa.uint32()))})
        rank = pa.table({"uid": uid, "clip_score": scores[start:stop]})
        off = offsets[start:stop + 1] - offsets[start]
        lists = pa.ListArray.from_arrays(pa.array(off, pa.int32()),
                                         pa.array(concepts[offsets[start]:offsets[stop]], pa.int32()))
        bal = pa.table({"uid": uid, "concepts": lists, "language": nulls.cast(pa.string())})
        for stage, t in (("dedup", dedup), ("clip_rank", rank), ("balance", bal)):
            path = work.partial(stage, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t, path)
    pairs = np.concatenate([np.stack([exact_c, exact_src], 1), np.stack([near_c, near_src], 1)])
    np.save(root / "planted_pairs.npy", pairs)
    (root / "shards.json").write_text(json.dumps(shards))
    return {"shards": len(shards), "planted_exact": int(len(exact_c)), "planted_near": int(len(near_c))}


SEMANTIC = {"exact": [], "phash_radius": None, "semantic_eps": 0.01, "keep": "clip_score"}
SEM_DIM, SEM_TOPICS, SEM_COPY_SHARE = 256, 20_000, 0.01


def synthesise_embeddings(n: int, shard_rows: int, root: Path, seed: int = 1) -> dict:
    """``clip_score`` tables (uid, 256-d float16 unit image embeddings) beside the partials, for
    SemDeDup: samples around SEM_TOPICS topic directions (cosine to their topic ~0.6, to each other
    ~0.35, as CLIP embeddings of one subject), and 1 % planted semantic copies at cosine >= 0.995 to
    their source. The planted pairs replace ``planted_pairs.npy``."""
    rng = np.random.default_rng(seed)
    work = WorkDir.at(str(root))
    topics = rng.standard_normal((SEM_TOPICS, SEM_DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    copies = np.sort(rng.permutation(n)[: int(n * SEM_COPY_SHARE)])
    # a copy's source is another row of its shard (rows are made shard by shard)
    shards = json.loads((root / "shards.json").read_text())
    pairs = []
    idx = np.arange(n, dtype=np.uint64)
    for s, start in enumerate(range(0, n, shard_rows)):
        stop = min(n, start + shard_rows)
        m = stop - start
        x = 0.75 * topics[rng.integers(0, SEM_TOPICS, m)] + rng.standard_normal((m, SEM_DIM)).astype(np.float32) / 16
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mine = copies[(copies >= start) & (copies < stop)] - start
        others = np.setdiff1d(np.arange(m), mine)  # a source is never itself a copy
        src = others[rng.integers(0, len(others), len(mine))]
        noise = rng.standard_normal((len(mine), SEM_DIM)).astype(np.float32) / 320
        x[mine] = x[src] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        pairs.append(np.stack([mine + start, src + start], axis=1))
        uid = pa.array(_hex(idx[start:stop] * np.uint64(2654435761) % np.uint64(2**61 - 1), 32))
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1), pa.float16()), SEM_DIM)
        path = work.stage_table("clip_score", shards[s])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(pa.table({"uid": uid, "image_emb": emb}), path)  # as a clip_score stage writes it
    planted = np.concatenate(pairs)
    np.save(root / "planted_pairs.npy", planted)
    return {"planted_semantic": int(len(planted)), "dim": SEM_DIM}


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


def _stage_and_context(stage: str, root: Path, n: int):
    from curate.core.config import StageSpec
    from curate.contract.base import GlobalContext, RunInfo
    from curate.runner.registry import build_stage

    name = "dedup" if stage in ("dedup_partitioned", "semantic") else stage
    params = dict(SEMANTIC if stage == "semantic" else STAGES[name])
    if stage == "balance":
        params["t"] = max(1.0, 20_000 * n / 400e6)
    if name == "dedup":
        params["partitions"] = PARTS if stage == "dedup_partitioned" else 1
    st = build_stage(StageSpec(name=name, params=params))
    shards = json.loads((root / "shards.json").read_text())
    ctx = GlobalContext(stage_id=name, shards=shards, run=RunInfo(run_id="scale", workdir=str(root), device="cpu"),
                        reads=tuple(st.reads()), fingerprint=f"scale-{n}")
    return st, ctx


def combine_part(root: Path, n: int, part: int) -> dict:
    """One part of the partitioned dedup combine (run in its own process, as on a worker)."""
    st, ctx = _stage_and_context("dedup_partitioned", root, n)
    t0 = time.perf_counter()
    table = st.combine_part(ctx, part, PARTS)
    write_table(table, ctx.parts(PARTS)[part])
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_hwm_mb()), "edges": table.num_rows}


def combine(stage: str, root: Path, n: int) -> dict:
    """One stage's combine on the synthesised partials (run in its own process)."""
    st, ctx = _stage_and_context(stage, root, n)
    t0 = time.perf_counter()
    summary = st.combine(ctx)
    out = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_hwm_mb())}
    if name_is_dedup(stage):
        out["recall_planted"] = round(_recall(root, st.results_dir(ctx.work), n), 5)
        out["groups"] = summary.get("groups")
    return out


def name_is_dedup(stage: str) -> bool:
    return stage in ("dedup", "dedup_partitioned", "semantic")


def _in_process(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "curate.bench.scale", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def partitioned_dedup(root: Path, n: int) -> dict:
    """The dedup combine split in PARTS tasks, then the final combine over their edge lists:
    seconds of the slowest part (the parts run in parallel on a cluster) and of all of them, the
    largest part's peak RSS, the final combine's."""
    parts = [_in_process(["--part", str(root), str(n), str(k)]) for k in range(PARTS)]
    if any("error" in p for p in parts):
        return next(p for p in parts if "error" in p)
    final = _in_process(["--combine", "dedup_partitioned", str(root), str(n)])
    if "error" in final:
        return final
    return {"seconds": round(max(p["seconds"] for p in parts) + final["seconds"], 1),
            "parts_total_s": round(sum(p["seconds"] for p in parts), 1),
            "part_peak_rss_mb": max(p["peak_rss_mb"] for p in parts), "final_s": final["seconds"],
            "peak_rss_mb": max(final["peak_rss_mb"], *(p["peak_rss_mb"] for p in parts)),
            "final_peak_rss_mb": final["peak_rss_mb"], "recall_planted": final["recall_planted"],
            "groups": final["groups"], "parts": PARTS}


def _recall(root: Path, results: Path, n: int) -> float:
    """Share of planted pairs whose two rows landed in one duplicate group."""
    import polars as pl

    pairs = np.load(root / "planted_pairs.npy")
    res = pl.read_parquet(results / "*.parquet", columns=["uid", "dup_group"])
    group = dict(zip(res["uid"].to_list(), res["dup_group"].to_list()))
    uid = lambda i: f"{(i * 2654435761) % (2**61 - 1):032x}"  # noqa: E731  the uid rule of synthesise
    hit = sum(1 for a, b in pairs.tolist() if group.get(uid(a)) is not None and group.get(uid(a)) == group.get(uid(b)))
    return hit / max(1, len(pairs))


def _disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def _fresh_root(name: str) -> Path:
    root = BENCH_DIR / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def run_semantic(sizes: list[int], shard_rows: int = 50_000) -> dict:
    """SemDeDup (dedup with ``semantic_eps`` 0.01 only) on 256-d embeddings at each size."""
    res: dict = {}
    for n in sizes:
        root = _fresh_root(f"scale-semantic-{n}")
        t0 = time.perf_counter()
        info = synthesise(n, shard_rows, root) | synthesise_embeddings(n, shard_rows, root)
        info["synthesis_s"] = round(time.perf_counter() - t0, 1)
        info["inputs_mb"] = _disk_mb(root)
        info["semantic"] = _in_process(["--combine", "semantic", str(root), str(n)])
        print(f"N={n} semantic: {info['semantic']}", flush=True)
        res[str(n)] = info
        shutil.rmtree(root, ignore_errors=True)
    if len(sizes) > 1 and all("seconds" in res[str(k)]["semantic"] for k in (sizes[0], sizes[-1])):
        res["growth"] = round(res[str(sizes[-1])]["semantic"]["seconds"] / res[str(sizes[0])]["semantic"]["seconds"], 2)
    save("scale_semantic", res)
    return res


def run(sizes: list[int] | None = None, shard_rows: int = 50_000) -> dict:
    sizes = sizes or [1_280_000]
    res: dict = {}
    for n in sizes:
        root = _fresh_root(f"scale-{n}")
        t0 = time.perf_counter()
        info = synthesise(n, shard_rows, root)
        info["synthesis_s"] = round(time.perf_counter() - t0, 1)
        info["partials_mb"] = _disk_mb(root)
        for stage in STAGES:
            info[stage] = _in_process(["--combine", stage, str(root), str(n)])
            print(f"N={n} {stage}: {info[stage]}", flush=True)
        info["dedup_partitioned"] = partitioned_dedup(root, n)
        print(f"N={n} dedup_partitioned: {info['dedup_partitioned']}", flush=True)
        info["work_dir_mb"] = _disk_mb(root)
        info["global_stages_s"] = round(sum(info[s].get("seconds", 0) for s in STAGES), 1)
        res[str(n)] = info
    if len(sizes) > 1:
        a, b = str(sizes[0]), str(sizes[-1])
        res["growth"] = {s: round(res[b][s]["seconds"] / max(res[a][s]["seconds"], 1e-9), 2)
                         for s in [*STAGES, "dedup_partitioned"] if "seconds" in res[a][s] and "seconds" in res[b][s]}
        res["growth_rows"] = round(sizes[-1] / sizes[0], 2)
    save("scale", res)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="curate.bench.scale")
    ap.add_argument("sizes", nargs="*", type=int, help="pool sizes (default 1280000)")
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--combine", nargs=3, metavar=("STAGE", "ROOT", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--part", nargs=3, metavar=("ROOT", "N", "PART"), help=argparse.SUPPRESS)
    ap.add_argument("--semantic", action="store_true", help="SemDeDup on 256-d embeddings instead")
    a = ap.parse_args(argv)
    if a.part:
        root, n, part = a.part
        print(json.dumps(combine_part(Path(root), int(n), int(part))))
        return 0
    if a.combine:
        stage, root, n = a.combine
        print(json.dumps(combine(stage, Path(root), int(n))))
        return 0
    if a.semantic:
        run_semantic(a.sizes or [1_280_000], a.shard_rows)
        return 0
    run(a.sizes or None, a.shard_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
