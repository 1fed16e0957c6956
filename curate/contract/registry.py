"""The stage table: a stage class registers itself here with ``@register_stage`` in its own module,
and a name in a recipe maps to it (no if/elif on strings). Finding, building and describing
stages is the runner's (``curate/runner/registry.py``)."""
from __future__ import annotations

from typing import Any, TypeVar

REGISTRY: dict[str, Any] = {}  # name -> stage class

T = TypeVar("T")


def register_stage(cls: T) -> T:
    """Class decorator: make the stage available under its ``name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise RuntimeError(f"stage {name!r} registered twice")
    REGISTRY[name] = cls
    return cls
