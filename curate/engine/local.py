"""In-process executor: the same stage code, no Dask; for tests and debugging (pdb works)."""
from __future__ import annotations

import logging
from typing import Callable

from tqdm import tqdm

from curate.config import RunConfig
from curate.engine.base import Executor, Outcome, describe_exception, register_executor

log = logging.getLogger(__name__)


class LocalExecutor(Executor):
    def __init__(self, retries: int = 0):
        self.retries = retries

    def map(self, fn: Callable, items: list, *, label: str,
            resources: dict[str, float] | None = None) -> list[Outcome]:
        out = []
        for item in tqdm(items, desc=label, disable=None, leave=False):
            for attempt in range(self.retries + 1):
                try:
                    out.append(Outcome(item, True, fn(item)))
                    break
                except Exception as e:  # reported per item; the run goes on with the others
                    if attempt == self.retries:
                        log.error("%s failed on %s: %s", label, item, describe_exception(e))
                        out.append(Outcome(item, False, error=describe_exception(e)))
        return out


@register_executor("inprocess")
def _make(cfg: RunConfig) -> Executor:
    return LocalExecutor(retries=cfg.executor.retries)
