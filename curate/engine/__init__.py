"""Engines run functions over shards; they never know what a stage computes."""
from curate.core.config import RunConfig, scheduler_address
from curate.engine.base import KINDS, Executor, Outcome


def make_executor(cfg: RunConfig) -> Executor:
    """The executor the run config asks for (its modules load here, on first use: Dask is heavy)."""
    from curate.engine import dask as _dask  # noqa: F401  (registers its kinds)
    from curate.engine import local as _local  # noqa: F401

    kind = cfg.executor.kind
    if kind == "local_cluster" and scheduler_address(cfg):
        kind = "address"  # DASK_SCHEDULER_ADDRESS wins over the embedded cluster
    return KINDS[kind](cfg)


__all__ = ["Executor", "Outcome", "make_executor"]
