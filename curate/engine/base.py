"""Executor contract and the registry of executor kinds (config ``executor.kind``)."""
from __future__ import annotations

import logging
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from curate.core.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    item: Any
    ok: bool
    value: Any = None
    error: str | None = None


def describe_exception(e: BaseException) -> str:
    """``Type: message (file:line)``; a user's mistake (ConfigError) is its message alone."""
    if isinstance(e, ConfigError):
        return str(e)
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


class Executor(ABC):
    @abstractmethod
    def map(self, fn: Callable, items: list, *, label: str,
            resources: dict[str, float] | None = None) -> list[Outcome]:
        """Run ``fn(item)`` for every item; failures are Outcomes, never exceptions."""

    def call(self, fn: Callable, *, label: str, resources: dict[str, float] | None = None) -> Outcome:
        return self.map(lambda _: fn(), [label], label=label, resources=resources)[0]

    def unseen_paths(self, paths: list[str]) -> dict[str, list[str]]:
        """Per worker that cannot read them, the local ``paths`` it does not see (empty: every
        worker sees every path, as when they share the driver's machine)."""
        return {}

    def close(self) -> None:  # noqa: B027  (an executor without resources has nothing to close)
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


KINDS: dict[str, Callable[[RunConfig], Executor]] = {}


def register_executor(kind: str) -> Callable:
    def deco(factory: Callable[[RunConfig], Executor]) -> Callable[[RunConfig], Executor]:
        KINDS[kind] = factory
        return factory
    return deco
