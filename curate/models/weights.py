"""Where a model's weights are, before anything loads them: local checkpoints, open_clip hub tags
already in a cache, and staging tags into a model cache (``curate models fetch``).

A run checks its weights once, in the driver, before the first shard (``preflight``): a tag that
is not cached on a machine that cannot reach the hub fails in seconds with the places it looked
and the command that stages it, instead of every worker retrying the hub for minutes.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

from curate.io.storage import is_url
from curate.models.remote_cache import local_model_cache, upload_model_cache

HUB_HOST = "huggingface.co"


def pretrained_cfg(model: str, tag: str) -> dict:
    import open_clip

    from curate.models.clip_registry import register_configs

    register_configs()
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise LookupError(f"open_clip has no pretrained tag {tag!r} for {model} (known tags: {known})")
    return cfg


def cache_dirs(model_cache: str | None) -> list[str | None]:
    """The model cache first, then the default caches (None: huggingface_hub's / open_clip's own)."""
    return [model_cache, None] if model_cache else [None]


def cached_weights(model: str, tag: str, model_cache: str | None) -> str | None:
    """The local file of an open_clip tag if it is already in a cache, without any network call
    (a cache on object storage is first copied to this machine)."""
    model_cache = local_model_cache(model_cache)
    cfg = pretrained_cfg(model, tag)
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    for cache in cache_dirs(model_cache):
        if hub:
            from huggingface_hub import try_to_load_from_cache

            repo, filename = os.path.split(hub)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith(".bin"):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                hit = try_to_load_from_cache(repo, name, cache_dir=cache)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        if cfg.get("url"):
            p = Path(cache or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
            if p.is_file():
                return str(p)
    return None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set or the hub does not answer a TCP connect in ``timeout_s``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def fetch_weights(model: str, tag: str, cache: str | None) -> str:
    """Download an open_clip tag into ``cache`` (needs the hub); return the local file. A cache
    on object storage gets the tag through a local copy of it, then an upload."""
    import open_clip

    if cache and is_url(cache):
        local = local_model_cache(cache)
        path = fetch_weights(model, tag, local)
        upload_model_cache(local, cache)
        return path
    hit = cached_weights(model, tag, cache)
    if hit:
        return hit
    if not hub_reachable():
        raise ConnectionError(f"{HUB_HOST} cannot be reached from this machine: run "
                              f"`curate models fetch {model} {tag} --to CACHE` where it can, then copy CACHE here")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
    return open_clip.download_pretrained(pretrained_cfg(model, tag), cache_dir=cache)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No hub requests inside (cached files are used as they are; huggingface_hub reads this flag
    at call time)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def weights_problem(model: str, pretrained: str | None, model_cache: str | None) -> str | None:
    """None when ``model`` with ``pretrained`` can be loaded here; else what is wrong and how to fix
    it. A tag missing from every cache is downloaded into the model cache when the hub answers."""
    import open_clip

    from curate.models.clip_registry import ModelError, register_configs, resolve_checkpoint

    register_configs()
    if open_clip.get_model_config(model) is None:
        return f"unknown open_clip model {model!r}"
    if not pretrained:
        return None
    if model_cache and is_url(model_cache):
        try:
            local_model_cache(model_cache)
        except Exception as e:  # unreachable bucket, missing credentials: one line, before any shard
            return f"model_cache {model_cache} cannot be read: {e}"
    try:
        if resolve_checkpoint(pretrained, model_cache):
            return None
    except ModelError as e:
        return f"{e}; give an existing file, absolute or relative to model_cache"
    try:
        if cached_weights(model, pretrained, model_cache):
            return None
    except LookupError as e:
        return str(e)
    looked = ", ".join(str(c) if c else "the default hub cache" for c in cache_dirs(model_cache))
    if not hub_reachable():
        return (f"weights of {model} {pretrained!r} are not cached (looked in {looked}) and {HUB_HOST} cannot "
                f"be reached: on a machine with internet run `curate models fetch {model} {pretrained} --to "
                f"{model_cache or 'CACHE'}` and set model_cache to that folder here")
    try:
        fetch_weights(model, pretrained, model_cache)
    except Exception as e:  # a hub error of any kind is the user's to see, in one line
        return f"weights of {model} {pretrained!r} could not be downloaded: {e}"
    return None
