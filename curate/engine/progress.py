"""Progress of one map over shards: a bar on a terminal, log lines elsewhere (CI, nohup, a
scheduler's job log), so a long stage can always be watched. Besides finished shards it counts
the samples the running tasks report (``core/heartbeat.py``), and says something at least every
``every_s`` seconds, also while the first shards are still running."""
from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("curate.progress")


class Progress:
    """``update()`` once per finished item, ``samples()`` as tasks report their samples;
    ``close()`` logs the stage's total time."""

    def __init__(self, label: str, total: int, every_s: float = 10.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()
        # (stage id, shard) -> (samples done, samples that stage goes through there or None)
        self._samples: dict[tuple[str, str], tuple[int, int | None]] = {}
        self._stages: list[str] = []  # in the order they first reported: a fused task's order
        self._first_seen: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        self.bar = tqdm(total=total, desc=label, leave=True, unit="shard") if sys.stderr.isatty() else None
        # while the bar stands, log lines (ours, a library's warnings) are printed above it, not through it
        self._redirect = logging_redirect_tqdm(loggers=[logging.root]) if self.bar is not None else None
        if self._redirect is not None:
            self._redirect.__enter__()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, daemon=True, name=f"progress-{label}")
        self._beat.start()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(time.monotonic()), refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self._log(now)

    def samples(self, stage: str, shard: str, done: int, total: int | None) -> None:
        """A running task's count: ``stage`` went through ``done`` samples of ``shard`` so far."""
        with self._lock:
            if stage not in self._stages:
                self._stages.append(stage)
                self._first_seen[stage] = time.monotonic()
            self._last_seen[stage] = time.monotonic()
            self._samples[(stage, shard)] = (done, total)

    def _beat_loop(self) -> None:
        while not self._stop.wait(1.0 if self.bar is not None else max(0.05, min(self.every_s, 1.0))):
            now = time.monotonic()
            if self.bar is not None:
                self.bar.set_postfix_str(self.postfix(now), refresh=True)
            elif now - self.last >= self.every_s:
                self._log(now)

    def _log(self, now: float) -> None:
        self.last = now
        log.info("%s", self.line(now))

    def per_stage(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(self._stages, 0)
            for (stage, _), (done, _) in self._samples.items():
                counts[stage] += done
        return counts

    def _deepest(self) -> tuple[str, int, float, float] | None:
        """The stage that reported last for the first time (the one running now in a fused task):
        (its id, samples it went through, samples it still has ahead on every shard, seconds it has
        been reporting). A shard it has not reached counts the mean samples of a shard seen so far."""
        with self._lock:
            if not self._stages:
                return None
            stage, items = self._stages[-1], dict(self._samples)
            # a task reports after its first second of work (heartbeat.Ticker): the stage began then
            seconds = self._last_seen[stage] - self._first_seen[stage] + 1.0
        sizes = [t for (_, _), (_, t) in items.items() if t] or [d for (_, _), (d, _) in items.items()]
        per_shard = sum(sizes) / len(sizes) if sizes else 0.0
        mine = {sh: dt for (st, sh), dt in items.items() if st == stage}
        done = sum(d for d, _ in mine.values())
        ahead = sum(max((t or per_shard) - d, 0) for d, t in mine.values())
        ahead += per_shard * max(self.total - max(len(mine), self.done), 0)  # shards it has not reached
        return stage, done, ahead, seconds

    def eta(self, now: float) -> str:
        """Seconds left at the running stage's rate (at the shard rate before any stage reports)."""
        deepest = self._deepest()
        if deepest is not None:
            _, done, ahead, seconds = deepest
            if done and seconds > 0:
                return f"~{ahead * seconds / done:.0f} s"
        elapsed = now - self.start
        if self.done:
            return f"~{(self.total - self.done) * elapsed / self.done:.0f} s"
        return "after the first samples"

    def samples_text(self) -> str:
        counts = self.per_stage()
        if not counts:
            return ""
        if len(counts) == 1:
            return f"{next(iter(counts.values())):,} samples"
        return "samples: " + ", ".join(f"{s} {n:,}" for s, n in counts.items())

    def postfix(self, now: float) -> str:
        """What the bar shows beside its shard count: samples done, and the ETA they give."""
        text = self.samples_text()
        return f"{text}, ETA {self.eta(now)}" if text else ""

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        deepest = self._deepest()
        rate = ""
        if deepest is not None and deepest[3] > 0:
            stage, done, _, seconds = deepest
            rate = f", {done / seconds:.1f} samples/s ({stage})"
        text = self.samples_text()
        return (f"{self.label}: {self.done}/{self.total} shards{', ' + text if text else ''}{rate}, "
                f"elapsed {elapsed:.0f} s, ETA {self.eta(now)}")

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=5)
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()
        text = self.samples_text()
        log.info("%s: %d/%d shards%s in %.1f s", self.label, self.done, self.total,
                 f" ({text})" if text else "", time.monotonic() - self.start)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
