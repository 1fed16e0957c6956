"""A model cache on object storage (``model_cache: s3://bucket/models``), for clusters whose nodes
share no disk: ``curate models fetch ... --to s3://bucket/models`` uploads the weights once, and
every process that needs them keeps a local copy (downloaded once per machine, then reused).

The local copy lives under ``$CURATE_MODEL_MIRROR`` (default ``~/.cache/curate/model-mirror``), one
folder per cache URL. Files are downloaded to a temp name and renamed, so workers of one node that
sync at the same time never load half a file. huggingface_hub's cache layout (``snapshots/`` linking
into ``blobs/``) is uploaded with the links followed and ``blobs/`` left out: the snapshot files are
what a lookup opens.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from curate.io import storage

_MIRRORS: dict[str, str] = {}


def mirror_root() -> Path:
    return Path(os.environ.get("CURATE_MODEL_MIRROR") or Path.home() / ".cache" / "curate" / "model-mirror")


def local_model_cache(model_cache: str | None) -> str | None:
    """``model_cache`` itself when local; for a URL, a local folder holding a copy of it (synced once
    per process: files missing locally, or of another size, are downloaded)."""
    if not model_cache or not storage.is_url(model_cache):
        return model_cache
    if model_cache not in _MIRRORS:
        local = mirror_root() / hashlib.blake2b(model_cache.encode(), digest_size=8).hexdigest()
        fs, root = storage.filesystem(model_cache)
        root = root.rstrip("/")
        for key, info in sorted(fs.find(root, detail=True).items()):
            dst = local / key[len(root) + 1:]
            if dst.is_file() and dst.stat().st_size == info.get("size"):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}")
            try:
                fs.get_file(key, str(tmp))
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
        _MIRRORS[model_cache] = str(local)
    return _MIRRORS[model_cache]


def upload_model_cache(local: str | Path, url: str) -> int:
    """Upload a local model cache to ``url`` (files already there with the same size are skipped);
    returns the number of files sent."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    sent = 0
    for folder, dirs, files in os.walk(local, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "blobs")
        for name in sorted(files):
            src = Path(folder) / name
            key = f"{root}/{src.relative_to(local).as_posix()}"
            if fs.exists(key) and fs.size(key) == src.stat().st_size:
                continue
            fs.put_file(str(src.resolve()), key)
            sent += 1
    _MIRRORS.pop(url, None)
    return sent
