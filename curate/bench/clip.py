"""CLIP scoring images/s, side by side in one run, per model:

- ``eager_forward``: open_clip's own forward on preloaded tensors (fp32 weights, bf16 autocast on
  CUDA, the full text context): the reference;
- ``optimised_forward``: the stage's forward with its speed-ups on the same tensors (bf16 weights
  and torch.compile on CUDA; text cut after its end-of-text; ``models/clip_forward.py``);
- ``stage_eager`` / ``stage_optimised``: the stage end to end (tar read, decode, preprocess,
  forward) with each setting; the optimised one decodes JPEGs with DALI where it is installed;
- ``data_path``: decode + preprocess alone, per decoder (PIL on the CPU, nvJPEG, DALI);
- ``decoder_score_diff_vs_pil``: what each device decoder changes in the scores, through the stage
  with fp32 weights on 1,000 samples, against the PIL path;
- the image tower's FLOPs per image (torch's FLOP counter) and, on a GPU we know, the share of its
  dense bf16 peak each forward reaches.

Targets (one H100): B/32 stage >= 8,000 img/s and >= 0.85 of its optimised forward; L/14 stage
>= 2,400 img/s (40 % of peak) and >= 0.9 of its optimised forward. On CPU the synthetic pool is
scored with the tiny model (the figures check the code, not the targets). On a GPU the shard is
real photos (COCO val2017 repeated to 10k samples, where ``../shared/data`` or
``CURATE_BENCH_PHOTOS`` gives them) and the models ViT-B-32 and ViT-L-14 with random weights (none ship
offline); on CPU, curate-tiny with the trained demo scorer, so score differences are those of real weights."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from curate.bench.common import BENCH_DIR, ROOT, bench_pool, save, timer
from curate.io.shards import expand_input, iter_samples
from curate.models.dali_preprocess import dali_available
from curate.models.clip_batches import loader_processes
from curate.stages.clip_score import ClipScoreStage
from curate.tools.demo import ensure_scorer

COCO_SHARD = ROOT.parent / "shared" / "data" / "shards" / "coco-val2017-mini-000000.tar"


def photo_shard(samples: int, source: Path | None = None) -> Path | None:
    """A shard of ``samples`` real photos: the COCO shard's samples repeated under new keys."""
    source = Path(os.environ.get("CURATE_BENCH_PHOTOS", source or COCO_SHARD))
    if not source.exists():
        return None
    out = BENCH_DIR / f"photos-{samples}.tar"
    if out.exists():
        return out
    import webdataset as wds

    originals = [smp for smp in iter_samples(source) if smp.image()]
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for i in range(samples):
            sink.write({"__key__": f"{i:09d}", **originals[i % len(originals)].members})
    tmp.rename(out)
    return out


# dense bf16 tensor-core peak (TFLOP/s, no sparsity) of the GPUs we name figures for
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def image_gflop(model) -> float:
    """The image tower's floating-point operations per image (multiply-adds count two). The
    counter cannot see inside nn.MultiheadAttention's fused inference kernel (its projections,
    a third of a ViT's FLOPs, would go uncounted), so that fast path is off while counting."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.encode_image(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 1e9


def eager_forward(clip, images, tokens, device: str) -> None:
    """open_clip's forward as a user would call it: the reference the optimised one is held to."""
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        fi = torch.nn.functional.normalize(clip.model.encode_image(images).float(), dim=-1)
        ft = torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1)
        (fi * ft).sum(-1).cpu()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_rate(run, items: int, device: str, repeats: int = 2) -> float:
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        with timer() as t:
            run()
            _sync(device)
        best = max(best, items / t["seconds"])
    return round(best, 1)


def _preloaded(clip, samples, caps) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct image preprocessed once, in shard order (a forward does not care whether two
    inputs are equal), with its caption's tokens."""
    imgs: dict[bytes, torch.Tensor] = {}
    good = []
    for i, s in enumerate(samples):
        data = s.image()
        if not data:
            continue
        if data not in imgs:
            try:
                imgs[data] = clip.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
            except Exception:  # corrupt synthetic images are skipped on the raw side
                continue
        good.append(i)
    return torch.stack([imgs[samples[i].image()] for i in good]), clip.tokenizer([caps[i] for i in good])


def bench_model(model: str, shard: str, n: int, batch: int, device: str, loader_workers: int | None = 0,
                pretrained: str | None = None) -> dict:
    gpu = device == "cuda"
    common = dict(model=model, pretrained=pretrained, batch_size=batch, loader_workers=loader_workers)
    eager = ClipScoreStage(ClipScoreStage.Params(**common, text_cache=0))
    # the caption cache is off: the photo shard repeats its captions, web shards rarely do
    fast = ClipScoreStage(ClipScoreStage.Params(**common, text_cache=0, compile=True,
                                                precision="bf16" if gpu else "auto",
                                                device_decoder="dali" if dali_available() else "nvjpeg"))
    clip, fast_clip = eager.clip(device, None), fast.clip(device, None)
    fast_clip.model.load_state_dict(clip.model.state_dict())  # the same weights (random without a checkpoint)
    samples = [s for _, s in zip(range(n), iter_samples(shard))]
    caps = [(s.caption_bytes() or b"").decode("utf-8", "replace") for s in samples]
    x, toks = _preloaded(clip, samples, caps)
    x, toks = x.to(device), toks.to(device)
    batches = [(x[k:k + batch], toks[k:k + batch]) for k in range(0, len(x), batch)]
    for xb, tb in batches[:2]:  # warm up (and compile) on a full and a short batch
        eager_forward(clip, xb, tb, device)
        fast.forward(xb, tb.cpu())
    fast.forward(*[t[:max(1, batch // 3)] for t in (x, toks.cpu())])
    res: dict = {"model": model, "weights": Path(pretrained).name if pretrained else "random", "device": device,
                 "batch_size": batch, "images": len(x),
                 "loader_workers": loader_processes(eager.params.loader_workers, device),
                 "optimised": {"precision": fast.params.precision, "compile": True,
                               "text_prefix": fast.forward.trims_text, "decode": fast.describe()["decode"]}}
    res["eager_forward_images_per_s"] = _best_rate(
        lambda: [eager_forward(clip, xb, tb, device) for xb, tb in batches], len(x), device)
    cpu_tokens = [tb.cpu() for _, tb in batches]
    res["optimised_forward_images_per_s"] = _best_rate(
        lambda: [fast.forward(xb, tb) for (xb, _), tb in zip(batches, cpu_tokens)], len(x), device)
    rows = list(range(len(samples)))

    def stage_rate(name: str, stage: ClipScoreStage) -> None:
        scored: list = []
        res[f"{name}_images_per_s"] = _best_rate(
            lambda: scored.append(len(stage.embed(shard, rows, caps, device, None)[0])), len(x), device)
        res[f"{name}_scored"] = scored[-1]

    # the loader paths first: a loader process forked after a DALI pipeline ran fails at exit
    stage_rate("stage_eager", eager)
    res["data_path_images_per_s"] = data_path_rates(model, shard, rows, caps, batch, device, loader_workers)
    stage_rate("stage_optimised", fast)
    res["stage_over_optimised_forward"] = round(res["stage_optimised_images_per_s"]
                                                / res["optimised_forward_images_per_s"], 3)
    res["target_stage_over_forward"] = 0.9 if "L-14" in model else 0.85
    gflop = image_gflop(clip.model)
    res["image_gflop_per_image"] = round(gflop, 2)
    peak = peak_tflops(device)
    if peak:
        res["peak_bf16_tflops"] = peak
        for key in ("eager_forward", "optimised_forward", "stage_optimised"):
            res[f"{key}_peak_share"] = round(res[f"{key}_images_per_s"] * gflop / 1e3 / peak, 3)
    res["scores_max_abs_diff_vs_eager_fp32"] = _score_difference(clip, fast, x[:1000], toks[:1000], device)
    # last: its DALI run must come after every loader process the other measurements fork
    res["decoder_score_diff_vs_pil"] = decoder_score_differences(clip, shard, rows[:1000], caps, batch, device)
    return res


def _decoders(device: str) -> dict[str, dict]:
    """The stage's decode settings this machine can run, PIL first."""
    decoders: dict[str, dict] = {"pil": {"device_decode": False}}
    if device == "cuda":
        decoders["nvjpeg"] = {"device_decode": True, "device_decoder": "nvjpeg"}
    if dali_available():
        decoders["dali"] = {"device_decode": True, "device_decoder": "dali"}
    return decoders


def data_path_rates(model: str, shard: str, rows: list[int], caps: list[str], batch: int, device: str,
                    loader_workers: int | None) -> dict[str, float]:
    """Decode + preprocess alone (the stage's loader and device decoding, no model), per decoder."""
    out = {}
    for name, params in _decoders(device).items():
        stage = ClipScoreStage(ClipScoreStage.Params(model=model, pretrained=None, batch_size=batch,
                                                     loader_workers=loader_workers, **params))
        stage.clip(device, None)
        out[name] = _best_rate(lambda stage=stage: sum(len(b[0]) for b in stage.batches(shard, rows, caps, device)),
                               len(rows), device)
    return out


def decoder_score_differences(clip, shard: str, rows: list[int], caps: list[str], batch: int,
                              device: str) -> dict[str, dict]:
    """What the decoder changes in the scores: each device decoder's scores against PIL's, through
    the stage end to end (reader, decode, resize, crop, normalise) with the same fp32 weights, on the
    rows both score: largest and mean |difference|, and the rows only one of them scored."""
    scores = {}
    for name, params in _decoders(device).items():
        stage = ClipScoreStage(ClipScoreStage.Params(model=clip.info["model"], pretrained=None, batch_size=batch,
                                                     loader_workers=0, precision="fp32", text_cache=0, **params))
        stage.clip(device, None).model.load_state_dict(clip.model.state_dict())
        scores[name] = {r: v[0] for r, v in stage.embed(shard, rows, caps, device, None)[0].items()}
    ref = scores.pop("pil")
    out = {}
    for name, got in scores.items():
        both = sorted(set(ref) & set(got))
        diff = np.abs(np.array([got[r] - ref[r] for r in both], dtype=np.float64))
        out[name] = {"max": float(diff.max()) if both else None, "mean": float(diff.mean()) if both else None,
                     "rows": len(both), "scored_by_one_only": len(set(ref) ^ set(got))}
    return out


def _score_difference(clip, fast: ClipScoreStage, x, toks, device: str) -> float:
    """Largest |score difference| of the optimised forward against open_clip's eager forward in
    fp32 (no autocast) on the same images."""
    with torch.inference_mode():
        fi = torch.nn.functional.normalize(clip.model.encode_image(x).float(), dim=-1)
        ft = torch.nn.functional.normalize(clip.model.encode_text(toks).float(), dim=-1)
        ref = (fi * ft).sum(-1).cpu().numpy()
    ours = np.concatenate([fast.forward(x[k:k + 256], toks[k:k + 256].cpu())[0] for k in range(0, len(x), 256)])
    return float(np.abs(ours - ref).max())


def run() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # one Dask worker's share of this 2-core machine
        # one 3,000-sample shard: a shard's fixed costs (loader start) weigh as on real 10k shards,
        # not as on a 1,000-sample toy shard
        pool = bench_pool(3000, 1)
        shard = expand_input(str(pool / "00000.tar"))[0]
        # the trained demo scorer (trained here once if missing): score errors on real weights, not random ones
        ckpt = str(ensure_scorer(ROOT / "demo" / "models"))
        # no loader process (as on a daemonic Dask worker): decoding runs on a helper thread
        res = {"curate-tiny": bench_model("curate-tiny", shard, 3000, 256, device, pretrained=ckpt),
               # decode in one DataLoader process beside the 1-thread forward (uses the second core)
               "curate-tiny+1_loader": bench_model("curate-tiny", shard, 3000, 256, device, loader_workers=1,
                                                   pretrained=ckpt)}
    else:
        photos = photo_shard(10_000)
        shard = str(photos) if photos else expand_input(str(bench_pool(4000, 4) / "00000.tar"))[0]
        res = {}
        for m in ("ViT-B-32", "ViT-L-14"):
            res[m] = bench_model(m, shard, 10_000, 256, device, loader_workers=None) | {
                "shard": Path(shard).name, "gpu": torch.cuda.get_device_name()}
            save("clip", res)  # after each model: a run cut short keeps the figures it has
        return res
    save("clip", res)
    return res
