"""Proxy CLIP training with open_clip's own training code (open_clip_train).

``train_clip`` runs open_clip_train on WebDataset shards and leaves one checkpoint (state_dict
only, loadable with ``torch.load(weights_only=True)``) in the output folder; curate.tools.evaluation
measures it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from curate.io.shards import expand_input, iter_samples
from curate.models.train_entry import deterministic_env

log = logging.getLogger(__name__)
# Part of every checkpoint's record: bump when a change to the training code changes its result,
# so that cached checkpoints are retrained instead of reused.
TRAINER_VERSION = "3"


@dataclass(frozen=True)
class TrainSpec:
    model: str = "curate-tiny"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0
    workers: int = 1
    threads: int = 2
    device: str = "cpu"
    # Fixed samples per epoch, drawn with replacement: every training set gets the same number
    # of steps whatever its size (DataComp compares curations at a fixed compute budget). The
    # draw is seeded (curate.models.train_entry), so a seed reproduces its run.
    samples_per_epoch: int | None = None


def count_samples(shards: list[str]) -> int:
    return sum(1 for p in shards for s in iter_samples(p) if s.image() and s.caption_bytes())


def _shard_bytes(shards: list[str]) -> list[int | None]:
    return [os.path.getsize(p) if os.path.exists(p) else None for p in shards]


def _die_with_parent() -> None:
    """In the training child (Linux): a SIGTERM when the parent dies, so stopping `make demo` or
    `make compare` does not leave a training process (and its loader workers) running."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent, as before
        pass


def train_clip(input: str | list[str], out_dir: str | Path, spec: TrainSpec = TrainSpec(),
               name: str = "proxy", reuse: bool = True) -> Path:
    """Train with open_clip_train; return the path of the final checkpoint.

    With ``reuse``, a checkpoint already in ``out_dir`` made by the same spec from the same shards
    (names, sizes, sample count) is returned without training again."""
    shards = expand_input(input)
    out = Path(out_dir).resolve()
    n = count_samples(shards)
    if n < spec.batch_size:
        raise ValueError(f"{n} samples in {len(shards)} shard(s): fewer than one batch of {spec.batch_size}")
    # shard names, not paths: a checkpoint is reused wherever the checkout (and its demo/) lives
    record = asdict(spec) | {"trainer": TRAINER_VERSION, "samples": n, "shards": [Path(p).name for p in shards],
                             "shard_bytes": _shard_bytes(shards)}
    final, side = out / f"{name}.pt", out / f"{name}.json"
    if reuse and final.exists() and side.exists() and _same_record(json.loads(side.read_text()), record):
        log.info("%s: trained before with the same spec and data, reusing it (sha256 %s)", final, file_sha256(final))
        return final
    logs = out / "logs"
    shutil.rmtree(logs / name, ignore_errors=True)
    argv = ["--train-data", "::".join(shards), "--dataset-type", "webdataset",
            "--train-num-samples", str(spec.samples_per_epoch or n), "--model", spec.model, "--batch-size", str(spec.batch_size),
            "--epochs", str(spec.epochs), "--lr", str(spec.lr), "--warmup", str(spec.warmup),
            "--wd", "0.1", "--seed", str(spec.seed), "--workers", str(spec.workers),
            "--device", spec.device, "--precision", "fp32", "--logs", str(logs), "--name", name,
            "--save-frequency", str(spec.epochs), "--report-to", "", "--log-every-n-steps", "10"]
    if spec.samples_per_epoch:
        argv.append("--dataset-resampled")
    env = os.environ | deterministic_env(spec.threads) | {
        "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.info("training %s on %d samples from %d shard(s), %d epochs", spec.model, n, len(shards), spec.epochs)
    per_epoch = spec.samples_per_epoch or n
    with subprocess.Popen([sys.executable, "-m", "curate.models.train_entry", *argv], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent) as proc:
        tail = follow_training(proc.stdout, spec.epochs * per_epoch, per_epoch, f"training {name}")
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"open_clip training failed (exit {code}):\n" + "\n".join(tail[-20:]))
    ckpts = sorted((logs / name / "checkpoints").glob("epoch_*.pt"),
                   key=lambda p: int(p.stem.split("_")[1]))
    if not ckpts:
        raise RuntimeError(f"open_clip training wrote no checkpoint under {logs / name}")
    import torch

    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    tmp = final.with_suffix(".pt.tmp")
    torch.save({"state_dict": state}, tmp)
    os.replace(tmp, final)
    digest = file_sha256(final)
    side.write_text(json.dumps(record | {"sha256": digest}, indent=2))
    log.info("trained %s: sha256 %s", final, digest)
    return final


_STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Loss: ([0-9.]+)")


def follow_training(lines: Iterable[str], total: int, per_epoch: int, label: str, every_s: float = 10.0) -> list[str]:
    """Show open_clip's training log as progress: on a terminal a bar (samples, epoch, loss, ETA),
    otherwise a log line every ``every_s`` seconds. Returns the last lines, for an error message."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="sample") if sys.stderr.isatty() else None
    start = last = time.monotonic()
    done, tail = 0, collections.deque(maxlen=50)
    for line in lines:
        tail.append(line.rstrip("\n"))
        m = _STEP.search(line)
        if not m:
            continue
        epoch, seen, loss = int(m.group(1)), int(m.group(2)), float(m.group(4))
        now_done = min(epoch * per_epoch + seen, total)
        now = time.monotonic()
        if bar is not None:
            bar.update(now_done - done)
            bar.set_postfix_str(f"epoch {epoch + 1}, loss {loss:.3f}")
        elif now - last >= every_s or now_done >= total:
            last = now
            rate = now_done / max(now - start, 1e-9)
            log.info("%s: epoch %d, %d/%d samples, loss %.3f, elapsed %.0f s, ETA %.0f s", label, epoch + 1,
                     now_done, total, loss, now - start, (total - now_done) / rate if rate else float("inf"))
        done = now_done
    if bar is not None:
        bar.close()
    return list(tail)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_record(saved: dict, wanted: dict) -> bool:
    """The same spec, trainer and data: shard names (a record that saved paths is read by their
    names), sizes and sample count."""
    saved = {k: v for k, v in saved.items() if k != "sha256"}
    saved["shards"] = [Path(p).name for p in saved.get("shards", [])]
    return saved == wanted
