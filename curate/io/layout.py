"""Where everything lives inside a work dir (DESIGN.md: WORK/<stage>/<shard>.parquet etc.).

The root is a local folder or a URL (``s3://bucket/work``); paths under it are ``Path`` or
``UPath`` objects with the same API (see ``curate.io.storage.work_path``)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from curate.io.storage import WorkPath, is_url, work_path


@dataclass(frozen=True)
class WorkDir:
    root: WorkPath

    @classmethod
    def at(cls, path: str | WorkPath) -> "WorkDir":
        return cls(work_path(path))

    @property
    def remote(self) -> bool:
        """On object storage (no rename, no local files): see ``scratch``."""
        return is_url(self.root)

    def stage_table(self, stage: str, shard: str) -> WorkPath:
        return self.root / stage / f"{shard}.parquet"

    def stage_glob(self, stage: str) -> str:
        """Every shard table of a stage, as a glob for polars/pyarrow."""
        return str(self.root / stage / "*.parquet")

    def stage_stats(self, stage: str, shard: str) -> WorkPath:
        return self.root / "stats" / stage / f"{shard}.parquet"

    def partial(self, stage: str, shard: str) -> WorkPath:
        """Per-shard summary of a global stage, kept on disk so a resumed run need not redo it."""
        return self.root / "partials" / stage / f"{shard}.parquet"

    def global_dir(self) -> WorkPath:
        return self.root / "global"

    def global_artifact(self, stage: str, suffix: str = ".parquet") -> WorkPath:
        return self.root / "global" / f"{stage}{suffix}"

    def combine_part(self, stage: str, fingerprint: str, part: int) -> WorkPath:
        """One share of a partitioned combine (``GlobalStage.combine_part``); the folder is named
        by the stage's fingerprint, so parts of another configuration are never read."""
        return self.root / "global" / f"{stage}.parts-{fingerprint[:16]}" / f"{part:05d}.parquet"

    def scratch(self, name: str) -> Path:
        """A local folder for a step's temporary spill files: under WORK/global/ when the work dir
        is local (it is sized for the pool), else in this machine's temp dir."""
        if self.remote:
            return Path(tempfile.gettempdir()) / f"curate-{name}-{os.getpid()}"
        return self.root / "global" / name

    def run_dir(self, run_id: str) -> WorkPath:
        return self.root / "runs" / run_id

    def stats_glob(self) -> str:
        return str(self.root / "stats" / "**" / "*.parquet")
