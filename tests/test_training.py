"""Proxy training with open_clip_train and the evaluation that scores a curation."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from curate.tools.evaluation import EvalSetError, balanced_accuracy, evaluate_clip, roc_auc
from curate.tools.synth import synthesize
from curate.tools.training import TrainSpec, train_clip
from tests.conftest import write_tar

SPEC = TrainSpec(epochs=1, batch_size=64, warmup=2, threads=1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clean")
    synthesize(root / "train", samples=256, shards=2, seed=11, fractions={})
    synthesize(root / "heldout", samples=60, shards=1, seed=12, fractions={})
    return root / "train", root / "heldout"


@pytest.mark.slow
def test_train_then_evaluate(clean, tmp_path: Path, caplog):
    import logging
    import shutil

    train, heldout = clean
    caplog.set_level(logging.INFO, logger="curate.tools.training")
    ckpt = train_clip(str(train / "*.tar"), tmp_path / "m", SPEC, name="t")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("visual.") for k in state)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training t: epoch 1, ")]
    assert progress and "256/256 samples, loss " in progress[-1], [r.getMessage() for r in caplog.records]
    stamp = os.stat(ckpt).st_mtime_ns
    assert train_clip(str(train / "*.tar"), tmp_path / "m", SPEC, name="t") == ckpt  # same spec and data: reused
    # the same shards elsewhere (a moved or re-cloned checkout): reused too
    shutil.copytree(train, tmp_path / "moved")
    assert train_clip(str(tmp_path / "moved" / "*.tar"), tmp_path / "m", SPEC, name="t") == ckpt
    assert os.stat(ckpt).st_mtime_ns == stamp
    m = evaluate_clip("curate-tiny", str(ckpt), heldout)
    assert m["samples"] == 60
    for task in ("shape", "colour", "count", "position"):
        assert 0.0 <= m[f"zeroshot_{task}"] <= 1.0 and 0.0 < m[f"chance_{task}"] < 1.0
    assert m["zeroshot_mean"] == pytest.approx(sum(m[f"zeroshot_{t}"] for t in ("shape", "colour", "count", "position")) / 4, abs=1e-3)
    assert 0.0 <= m["retrieval_i2t_r1"] <= 1.0 and 0.0 <= m["match_vs_shuffled_auc"] <= 1.0


@pytest.mark.slow
def test_training_is_reproducible(clean, tmp_path: Path):
    """Same seed, spec and data: the same checkpoint bytes, also with resampled (fixed-budget)
    training, whose webdataset shuffle would otherwise seed itself from the clock."""
    import json

    from curate.tools.training import file_sha256

    train, _ = clean
    spec = TrainSpec(epochs=1, batch_size=64, warmup=2, threads=1, samples_per_epoch=192, seed=4)
    a = train_clip(str(train / "*.tar"), tmp_path / "a", spec, name="m", reuse=False)
    b = train_clip(str(train / "*.tar"), tmp_path / "b", spec, name="m", reuse=False)
    assert a.read_bytes() == b.read_bytes()
    assert json.loads((tmp_path / "a" / "m.json").read_text())["sha256"] == file_sha256(a)
    c = train_clip(str(train / "*.tar"), tmp_path / "c", TrainSpec(**{**spec.__dict__, "seed": 5}), name="m")
    assert c.read_bytes() != a.read_bytes()  # the seed matters


def test_training_refuses_too_little_data(tmp_path: Path):
    from tests.conftest import jpeg_bytes

    shard = write_tar(tmp_path / "few.tar", [("0.jpg", jpeg_bytes()), ("0.txt", b"a red square")])
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_clip(str(shard), tmp_path / "m", SPEC)


def test_evaluation_needs_a_labelled_set(tmp_path: Path, clean):
    with pytest.raises(EvalSetError, match="ground_truth.parquet"):
        evaluate_clip("curate-tiny", None, tmp_path)


def test_metrics():
    import numpy as np

    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5  # ties count half
    # always answering the head class: high plain accuracy, chance balanced accuracy
    labels = np.array([0] * 90 + [1] * 10)
    assert balanced_accuracy(np.zeros(100, dtype=int), labels) == 0.5


def test_compare_decides_only_when_the_paired_interval_excludes_zero():
    from curate.tools.compare import interval, verdicts

    mean, lo, hi = interval([0.2, 0.3, 0.25])
    assert mean == pytest.approx(0.25) and lo < 0.2 and hi > 0.3  # t with 2 degrees of freedom is wide
    rows = [{"recipe": r, "seed": s, "zeroshot_mean": v}
            for r, vals in (("no_filter", [0.20, 0.30, 0.25]), ("good", [0.26, 0.37, 0.31]),
                            ("noisy", [0.30, 0.20, 0.26]))
            for s, v in enumerate(vals)]
    got = {v["recipe"]: v["beats_baseline"] for v in verdicts(rows)}
    # "good" is better on every seed by 0.06-0.07: decided, although the per-recipe intervals overlap
    assert got == {"no_filter": None, "good": "yes", "noisy": "undecided"}


def test_compare_table_has_a_verdict_per_task():
    from curate.tools.compare import TASKS, format_table

    def row(recipe: str, seed: int, shape: float, colour: float) -> dict:
        tasks = {"shape": shape, "colour": colour, "count": 0.3, "position": 0.2}
        return {"recipe": recipe, "seed": seed, "samples_kept": 100, "samples": 10,
                "zeroshot_mean": sum(tasks.values()) / 4, **{f"zeroshot_{t}": v for t, v in tasks.items()},
                **{f"chance_{t}": 0.1 for t in TASKS}, "retrieval_i2t_r1": 0.1, "retrieval_t2i_r1": 0.1,
                "match_vs_shuffled_auc": 0.6}

    # better shape on every seed, colour noise that hides it in the mean
    rows = [row("no_filter", s, 0.10 + 0.01 * s, c) for s, c in enumerate([0.2, 0.6, 0.3])]
    rows += [row("shapely", s, 0.15 + 0.01 * s, c) for s, c in enumerate([0.5, 0.1, 0.4])]
    text = format_table(rows, 1, 10, [0, 1, 2])
    per_task = text.split("Per task")[1]
    assert "| shapely | yes (+0.050) | undecided (-0.033) | undecided (+0.000) | undecided (+0.000) |" in per_task
    assert "| shapely | 3 |" in text and "undecided" in text.split("Per task")[0]


def test_a_killed_parent_takes_its_training_process_with_it(clean, tmp_path: Path):
    """SIGKILL of the process running train_clip (a stopped `make demo` or `make compare`) leaves no
    open_clip training running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (f"from curate.tools.training import TrainSpec, train_clip\n"
              f"train_clip({str(clean[0] / '*.tar')!r}, {str(tmp_path / 'm')!r}, "
              f"TrainSpec(epochs=50, batch_size=64, warmup=2, threads=1), name='long')\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                stat = open(f"/proc/{pid}/stat").read().split()
            except OSError:
                continue
            if "curate.models.train_entry" in cmd and str(tmp_path / "m") in cmd and stat[2] != "Z":
                found.append(int(pid))
        return found

    deadline = time.time() + 60
    while not children() and time.time() < deadline:
        time.sleep(0.2)
    assert children(), "training never started"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while children() and time.time() < deadline:
        time.sleep(0.2)
    assert not children()
