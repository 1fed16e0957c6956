"""Our architectures registered with open_clip's factory, and where a checkpoint lives: what both
model loading (``clip.py``) and the weight cache (``weights.py``) need."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from curate.models.remote_cache import local_model_cache

CONFIG_DIR = Path(__file__).parent / "configs"


class ModelError(RuntimeError):
    """A model cannot be built or its weights cannot be found locally."""


def register_configs() -> None:
    """Make our architectures (e.g. ``curate-tiny``) known to open_clip's factory, and have CoCa's
    text decoder initialised (``init_coca_decoder``)."""
    import open_clip

    if "curate-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    init_coca_decoder()


def init_coca_decoder() -> None:
    """open_clip's ``MultimodalTransformer`` (CoCa's text decoder) never initialises its
    ``text_projection`` (its ``init_parameters`` would, but is never called and no longer runs), so
    the projection stays ``torch.empty``: whatever the memory held (often zeros: every token scores
    alike), or NaN under ``torch.use_deterministic_algorithms`` (training then diverges at the first
    step). Here it is drawn as that method draws it (normal, std width^-0.5) once the decoder is
    built, so a CoCa model made from random weights is the same on every run and trains."""
    import torch
    from open_clip import transformer

    cls = transformer.MultimodalTransformer
    if getattr(cls, "_curate_initialises", False):
        return
    built = cls.__init__

    def __init__(self, *args, **kwargs):
        built(self, *args, **kwargs)
        torch.nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    cls.__init__ = __init__
    cls._curate_initialises = True


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
