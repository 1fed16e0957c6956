"""Dask distributed executor: an embedded LocalCluster, or any running scheduler by address.

Only paths and small summaries cross the wire: a task is (function, shard path) and returns a
dict of counts. Retries re-run a task on another worker when one dies.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import uuid
from typing import Callable, Iterator

from curate.core import heartbeat
from curate.core.config import RunConfig, scheduler_address
from curate.engine.base import Executor, Outcome, describe_exception, register_executor
from curate.engine.progress import Progress
from curate.engine.watchdog import run_with_deadline

log = logging.getLogger(__name__)


def _quiet_dask_logs(level: int = logging.WARNING) -> None:
    """distributed logs every worker start at INFO; keep our own progress readable. A logger set
    quieter already stays so (the CLI silences bokeh's warning about the local dashboard)."""
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith(("distributed", "bokeh", "tornado")):
            logger = logging.getLogger(name)
            logger.setLevel(max(level, logger.level))


class DaskExecutor(Executor):
    def __init__(self, client, retries: int, cluster=None, task_timeout_s: float | None = None):
        self.client = client
        self.cluster = cluster
        self.retries = retries
        self.task_timeout_s = task_timeout_s
        _quiet_dask_logs()
        log.info("dask dashboard: %s", client.dashboard_link)

    def map(self, fn: Callable, items: list, *, label: str,
            resources: dict[str, float] | None = None) -> list[Outcome]:
        from distributed import as_completed

        if not items:
            return []
        if self.task_timeout_s:
            fn = functools.partial(run_with_deadline, fn, self.task_timeout_s)
        tag = uuid.uuid4().hex[:8]
        fn = functools.partial(_reporting_samples, tag, fn)
        keys = [f"{label}-{tag}-{i}" for i in range(len(items))]
        with Progress(label, len(items)) as bar, self._samples_of(tag, bar):
            futures = self.client.map(fn, items, key=keys, retries=self.retries, pure=False,
                                      resources=resources or None)
            by_key = {f.key: (i, item) for i, (f, item) in enumerate(zip(futures, items))}
            results: list[Outcome | None] = [None] * len(items)
            for fut in as_completed(futures):
                i, item = by_key[fut.key]
                try:
                    results[i] = Outcome(item, True, fut.result())
                except Exception as e:  # the task failed on every retry: report, keep going
                    log.error("%s failed on %s: %s", label, item, describe_exception(e))
                    results[i] = Outcome(item, False, error=describe_exception(e))
                fut.release()
                bar.update(1)
        return [r for r in results if r is not None]

    @contextlib.contextmanager
    def _samples_of(self, tag: str, bar: Progress) -> Iterator[None]:
        """The sample counts the tasks of one map report (worker events), into ``bar``; the
        warnings they log, into the driver's log. A warning whose event reaches the driver after the
        map's last result is read back from the scheduler's event log at the end, so none is lost."""
        logged: set[tuple[float, str]] = set()

        def on_samples(event: tuple[float, dict]) -> None:
            msg = event[1]
            if isinstance(msg, dict) and msg.get("tag") == tag:
                bar.samples(msg["stage"], msg["shard"], msg["done"], msg["total"])

        def on_log(event: tuple[float, dict]) -> None:
            msg = event[1]
            key = (event[0], json.dumps(msg, sort_keys=True, default=str))
            if isinstance(msg, dict) and msg.get("tag") == tag and key not in logged:
                logged.add(key)
                logging.getLogger(msg["log"]).log(msg["level"], "%s", msg["message"])

        self.client.subscribe_topic(PROGRESS_TOPIC, on_samples)
        self.client.subscribe_topic(LOG_TOPIC, on_log)
        try:
            yield
            try:
                late = self.client.get_events(LOG_TOPIC)
            except Exception:  # the scheduler cannot answer (it is closing): the warnings seen so far stand
                late = ()
            for event in late:
                on_log(event)
        finally:
            for topic in (PROGRESS_TOPIC, LOG_TOPIC):
                try:
                    self.client.unsubscribe_topic(topic)
                except Exception:  # the scheduler already gone (an interrupt): nothing to unsubscribe from
                    pass

    def unseen_paths(self, paths: list[str]) -> dict[str, list[str]]:
        got = self.client.run(_missing, paths)  # on every worker
        return {w: miss for w, miss in sorted(got.items()) if miss}

    def close(self) -> None:
        if self.cluster is not None:
            # Our own workers: whatever they log while the cluster goes down (tasks cancelled by an
            # interrupt, a heartbeat to the scheduler that has just closed) is not news to the user.
            for nanny in (False, True):
                try:
                    self.client.run(_silence_logs, os.getpid(), nanny=nanny)
                except Exception:  # a worker already gone: nothing left to silence there
                    pass
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _silence_logs(driver_pid: int) -> None:
    if os.getpid() == driver_pid:
        # a LocalCluster's nannies live in the driver: silence Dask's loggers only, so the driver
        # (e.g. a tool that runs several pipelines in one process) still logs its own progress
        _quiet_dask_logs(logging.CRITICAL + 1)
    else:
        logging.disable(logging.CRITICAL)


PROGRESS_TOPIC = "curate-progress"  # sample counts of running tasks
LOG_TOPIC = "curate-log"  # warnings that tasks log on workers


_task = threading.local()  # the tag of the map whose task this worker thread runs


class _ToDriver(logging.Handler):
    """On a worker: warnings logged while a task runs (a library's ``WARNING:root:`` lines among
    them) go to the driver, which logs them through its own handlers, above its progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tag = getattr(_task, "tag", None)
        if tag is None:  # outside a task: where a worker's own log goes
            sys.stderr.write(self.format(record) + "\n")
            return
        try:
            from distributed import get_worker

            get_worker().log_event(LOG_TOPIC, {"tag": tag, "log": record.name, "level": record.levelno,
                                               "message": record.getMessage()[:2000]})
        except Exception:  # no worker here after all, or its connection is closing
            sys.stderr.write(self.format(record) + "\n")


def _forward_warnings() -> None:
    """Install _ToDriver on this worker process's root logger, once."""
    root = logging.getLogger()
    if not any(isinstance(h, _ToDriver) for h in root.handlers):
        handler = _ToDriver(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def _reporting_samples(tag: str, fn: Callable, item: object) -> object:
    """Run ``fn(item)`` on a worker with its sample counts (and its warnings) sent to the driver
    as worker events."""
    from distributed import get_worker

    worker = get_worker()
    _forward_warnings()

    def send(stage: str, shard: str, done: int, total: int | None) -> None:
        worker.log_event(PROGRESS_TOPIC, {"tag": tag, "stage": stage, "shard": shard, "done": done, "total": total})

    _task.tag = tag
    try:
        with heartbeat.reporting(send):
            return fn(item)
    finally:
        _task.tag = None


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Worker processes started in this block ignore SIGINT: a Ctrl-C on the terminal reaches the
    whole process group, and the driver alone should answer it (with one line, then closing the
    cluster), not each worker with its own KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through spawn's exec
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _missing(paths: list[str]) -> list[str]:
    """The paths this process cannot read (run on each worker)."""
    return [p for p in paths if not os.access(p, os.R_OK)]


def _has_cuda() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or a broken driver: run on CPU
        return 0


@register_executor("local_cluster")
def _make_local_cluster(cfg: RunConfig) -> Executor:
    from distributed import Client, LocalCluster

    _quiet_dask_logs()
    ex = cfg.executor
    resources = {}
    if cfg.device != "cpu" and _has_cuda():
        resources["GPU"] = 1  # each worker process may hold one model on one GPU
        # non-daemonic workers may start processes: the CLIP stage's DataLoader decodes in them.
        # Set for the whole driver, not a `with` block: the nanny reads it again when it
        # restarts a worker that died.
        import dask

        dask.config.set({"distributed.worker.daemon": False})
    with _children_ignore_sigint():
        cluster = LocalCluster(n_workers=ex.n_workers, threads_per_worker=ex.threads_per_worker,
                               processes=True, memory_limit=ex.memory_limit,
                               dashboard_address="127.0.0.1:0" if ex.dashboard else None,
                               resources=resources or None, silence_logs=logging.WARNING)
    client = Client(cluster)
    return DaskExecutor(client, ex.retries, cluster, ex.task_timeout_s)


def cuda_worker_specs(gpus: list[int], cpu_workers: int, threads: int, memory_limit: str) -> dict[str, dict]:
    """SpecCluster workers for one GPU node: one single-threaded worker per GPU, pinned with
    ``CUDA_VISIBLE_DEVICES`` (its model sees that GPU as cuda:0) and offering the ``GPU`` resource
    the GPU stages ask for; plus CPU workers without it, so CPU stages use the rest of the node."""
    from distributed import Nanny

    specs = {f"gpu-{g}": {"cls": Nanny, "options": {
        "nthreads": 1, "memory_limit": memory_limit, "resources": {"GPU": 1},
        "env": {"CUDA_VISIBLE_DEVICES": str(g)}}} for g in gpus}
    specs |= {f"cpu-{i}": {"cls": Nanny, "options": {"nthreads": threads, "memory_limit": memory_limit,
                                                       "env": {"CUDA_VISIBLE_DEVICES": ""}}}
              for i in range(cpu_workers)}
    return specs


@register_executor("local_cuda_cluster")
def _make_local_cuda_cluster(cfg: RunConfig) -> Executor:
    import dask
    from distributed import Client, Scheduler, SpecCluster

    from curate.core.config import ConfigError

    _quiet_dask_logs()
    ex = cfg.executor
    gpus = ex.gpus if ex.gpus is not None else list(range(_has_cuda()))
    if not gpus:
        raise ConfigError("executor.kind local_cuda_cluster: no CUDA device is visible; set executor.gpus, "
                          "or use kind local_cluster with device: cpu")
    dask.config.set({"distributed.worker.daemon": False})  # the CLIP loader starts processes
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": "127.0.0.1:0" if ex.dashboard else None}}
    with _children_ignore_sigint():
        cluster = SpecCluster(workers=cuda_worker_specs(gpus, ex.n_workers, ex.threads_per_worker, ex.memory_limit),
                              scheduler=scheduler, silence_logs=logging.WARNING)
    client = Client(cluster)
    log.info("local_cuda_cluster: %d GPU worker(s) (%s), %d CPU worker(s)", len(gpus), gpus, ex.n_workers)
    return DaskExecutor(client, ex.retries, cluster, ex.task_timeout_s)


@register_executor("address")
def _make_remote(cfg: RunConfig) -> Executor:
    from distributed import Client

    addr = scheduler_address(cfg)
    if not addr:
        raise ValueError("executor.kind=address needs executor.address or DASK_SCHEDULER_ADDRESS")
    try:
        client = Client(addr, timeout="30s")
    except (OSError, TimeoutError) as e:
        raise ConnectionError(f"cannot reach dask scheduler at {addr}: {describe_exception(e)}") from e
    return DaskExecutor(client, cfg.executor.retries, task_timeout_s=cfg.executor.task_timeout_s)
