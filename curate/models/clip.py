"""open_clip model loading: a name + a pretrained tag or a local checkpoint, never a silent download.

A model is named as open_clip does (``ViT-L-14`` + ``openai``). Offline, ``pretrained`` is a local
checkpoint path (absolute, or relative to the run's ``model_cache``), loaded with
``torch.load(weights_only=True)``. ``pretrained: null`` builds random weights (tests, benchmarks).
Our tiny architectures live in ``models/configs/`` and are registered with open_clip on import.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from curate.models.clip_registry import (  # noqa: F401  (importers take them from here too)
    CONFIG_DIR, ModelError, embed_dim, file_sha256, register_configs, resolve_checkpoint)
from curate.models.remote_cache import local_model_cache
from curate.models.weights import cached_weights, hub_offline

log = logging.getLogger(__name__)


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
