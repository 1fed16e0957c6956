"""Installed package versions, for the file metadata and fingerprints of the stages that use them."""
from __future__ import annotations


def installed(package: str) -> str:
    """The installed version of ``package``, or "not installed" (preflight then names the extra)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
