"""In-process executor: the same stage code, no Dask; for tests and debugging (pdb works)."""
from __future__ import annotations

import logging
from typing import Any, Callable

from curate.core import heartbeat
from curate.core.config import RunConfig
from curate.engine.base import Executor, Outcome, describe_exception, register_executor
from curate.engine.progress import Progress

log = logging.getLogger(__name__)


class LocalExecutor(Executor):
    def __init__(self, retries: int = 0):
        self.retries = retries

    def map(self, fn: Callable, items: list, *, label: str,
            resources: dict[str, float] | None = None) -> list[Outcome]:
        out = []
        with Progress(label, len(items)) as progress, heartbeat.reporting(progress.samples):
            for item in items:
                self._run_one(fn, item, label, out)
                progress.update()
        return out

    def _run_one(self, fn: Callable, item: Any, label: str, out: list[Outcome]) -> None:
        for attempt in range(self.retries + 1):
            try:
                out.append(Outcome(item, True, fn(item)))
                return
            except Exception as e:  # reported per item; the run goes on with the others
                if attempt == self.retries:
                    log.error("%s failed on %s: %s", label, item, describe_exception(e))
                    out.append(Outcome(item, False, error=describe_exception(e)))


@register_executor("inprocess")
def _make(cfg: RunConfig) -> Executor:
    return LocalExecutor(retries=cfg.executor.retries)
