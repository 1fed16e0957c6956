"""Progress of one map over shards: a bar on a terminal, log lines elsewhere (CI, nohup, a
scheduler's job log), so a long stage can always be watched."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("curate.progress")


class Progress:
    """``update()`` once per finished item; ``close()`` logs the stage's total time."""

    def __init__(self, label: str, total: int, every_s: float = 10.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = tqdm(total=total, desc=label, leave=True, unit="shard") if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else float("inf")
        return (f"{self.label}: {self.done}/{self.total} shards, {rate:.2f} shards/s, "
                f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s: %d/%d shards in %.1f s", self.label, self.done, self.total, time.monotonic() - self.start)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
