"""Engines run functions over shards; they never know what a stage computes."""
from curate.engine.base import Executor, Outcome, make_executor

__all__ = ["Executor", "Outcome", "make_executor"]
