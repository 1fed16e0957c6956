"""Where everything lives inside a work dir (DESIGN.md: WORK/<stage>/<shard>.parquet etc.)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkDir:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "WorkDir":
        return cls(Path(path).resolve())

    def stage_table(self, stage: str, shard: str) -> Path:
        return self.root / stage / f"{shard}.parquet"

    def stage_glob(self, stage: str) -> str:
        """Every shard table of a stage, as a glob for polars/pyarrow."""
        return str(self.root / stage / "*.parquet")

    def stage_stats(self, stage: str, shard: str) -> Path:
        return self.root / "stats" / stage / f"{shard}.parquet"

    def partial(self, stage: str, shard: str) -> Path:
        """Per-shard summary of a global stage, kept on disk so a resumed run need not redo it."""
        return self.root / "partials" / stage / f"{shard}.parquet"

    def global_dir(self) -> Path:
        return self.root / "global"

    def global_artifact(self, stage: str, suffix: str = ".parquet") -> Path:
        return self.root / "global" / f"{stage}{suffix}"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def stats_glob(self) -> str:
        return str(self.root / "stats" / "**" / "*.parquet")
