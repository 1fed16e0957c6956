"""The errors a user can cause, shown as one line by the CLI. Kept free of heavy imports, so the
command line can catch them without loading pydantic, pyarrow or polars first."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line; shown without a traceback."""


class WorkDirError(OSError):
    """The work dir (or a file in it) cannot be written: full disk, read-only, permissions."""


class RefusedOutput(WorkDirError):
    """An output that would destroy or mix data is refused (a user's choice to change: exit 2)."""
