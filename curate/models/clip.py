"""open_clip model loading: a name + a pretrained tag or a local checkpoint, never a silent download.

A model is named as open_clip does (``ViT-L-14`` + ``openai``). Offline, ``pretrained`` is a local
checkpoint path (absolute, or relative to the run's ``model_cache``), loaded with
``torch.load(weights_only=True)``. ``pretrained: null`` builds random weights (tests, benchmarks).
Our tiny architectures live in ``models/configs/`` and are registered with open_clip on import.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from curate.models.remote_cache import local_model_cache

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"


class ModelError(RuntimeError):
    """A model cannot be built or its weights cannot be found locally."""


def register_configs() -> None:
    """Make our architectures (e.g. ``curate-tiny``) known to open_clip's factory."""
    import open_clip

    if "curate-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def embed_dim(model: str) -> int:
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ModelError(f"unknown open_clip model {model!r}")
    return int(cfg["embed_dim"])


@lru_cache(maxsize=16)
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_checkpoint(pretrained: str | None, model_cache: str | None) -> str | None:
    """A local path for ``pretrained`` when it names a file; None for a tag or random weights."""
    if not pretrained:
        return None
    local = local_model_cache(model_cache)
    for cand in (Path(pretrained).expanduser(), Path(local or ".") / pretrained):
        if cand.is_file():
            return str(cand.resolve())
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ModelError(f"checkpoint {pretrained!r} not found (model_cache: {model_cache})")
    return None


@dataclass
class LoadedClip:
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    info: dict[str, Any]


def load_clip(model: str, pretrained: str | None, *, device: str = "cpu", precision: str = "fp32",
              model_cache: str | None = None, seed: int = 0) -> LoadedClip:
    """The model with its weights; without ``pretrained``, random weights drawn from ``seed``
    (the same on every run and worker, without touching the process's own random state)."""
    import open_clip
    import torch

    from curate.models.weights import cached_weights, hub_offline

    register_configs()
    model_cache = local_model_cache(model_cache)
    ckpt = resolve_checkpoint(pretrained, model_cache)
    tag = pretrained if pretrained and ckpt is None else None
    # A cached tag loads without asking the hub (no retries on a machine without internet).
    try:
        cached = tag is not None and cached_weights(model, tag, model_cache) is not None
        seeded = torch.random.fork_rng(devices=[]) if not (ckpt or tag) else contextlib.nullcontext()
        with hub_offline() if cached else contextlib.nullcontext(), seeded:
            if not (ckpt or tag):
                torch.manual_seed(seed)
            m, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=ckpt or tag, precision=precision, device=device,
                cache_dir=model_cache, weights_only=True)
    except LookupError as e:
        raise ModelError(str(e)) from None
    except RuntimeError as e:
        raise ModelError(f"cannot load {model} ({pretrained}): {e}") from e
    except Exception as e:  # hub errors when offline have many types
        raise ModelError(f"cannot load {model} ({pretrained}); offline, give a local checkpoint path: {e}") from e
    m.eval()
    torch.set_grad_enabled(False)
    info = {"model": model, "pretrained": pretrained, "checkpoint": ckpt,
            "checkpoint_sha256": file_sha256(ckpt) if ckpt else None,
            "preprocess": repr(preprocess), "precision": precision, "device": device,
            "random_seed": None if (ckpt or tag) else seed,
            "open_clip_version": open_clip.__version__, "embed_dim": embed_dim(model)}
    return LoadedClip(m, preprocess, open_clip.get_tokenizer(model), device, info)
