"""Subprocess entry for open_clip's own training code, with curate's architectures registered.

Run as ``python -m curate.models.train_entry <open_clip_train args>``; a subprocess keeps
open_clip_train's logging setup and torch state out of the caller.

Training here is reproducible: the same torch version, seed and arguments give the same
checkpoint bytes on any x86-64 machine with AVX2. Three things would otherwise differ between runs
or machines:

- webdataset's sample shuffle seeds itself from the process id and the clock when open_clip_train
  passes no generator; here each shuffle gets ``random.Random(seed, call number)``;
- the number of threads changes the order of floating-point reductions: it is fixed
  (``deterministic_env``);
- MKL, oneDNN and ATen pick kernels by the CPU's instruction set: ``deterministic_env`` pins all
  three to AVX2.
"""
from __future__ import annotations

import itertools
import random
import sys


def deterministic_env(threads: int) -> dict[str, str]:
    """Environment for a training process whose results do not depend on the machine."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "MKL_CBWR": "AVX2,STRICT",
            "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}


def _seed_from_argv(argv: list[str]) -> int:
    return int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0


def seed_sample_shuffle(seed: int) -> None:
    """Give webdataset's sample shuffle a seeded generator: call ``k`` (epoch ``k`` in a
    persistent loader worker) shuffles with ``Random((seed, k))``."""
    import webdataset
    from webdataset.filters import _shuffle, pipelinefilter

    calls = itertools.count()

    def seeded(data, bufsize=1000, initial=100, rng=None, handler=None):
        rng = rng or random.Random(f"{seed}/{next(calls)}")
        return _shuffle(data, bufsize, initial, rng, handler)

    webdataset.shuffle = pipelinefilter(seeded)


def main(argv: list[str]) -> int:
    import torch

    from curate.models.clip import register_configs

    torch.use_deterministic_algorithms(True, warn_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    register_configs()
    seed_sample_shuffle(_seed_from_argv(argv))
    from open_clip_train.main import main as train_main

    return int(train_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
