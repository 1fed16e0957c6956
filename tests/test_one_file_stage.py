"""A new stage is one file: dropped into a copy of the package, it is a stage of `curate stages`,
a `make` target, a page of the generated reference, and runs on in-memory samples; nothing else
is edited."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

STAGE = '''"""Drops captions longer than a limit."""
from __future__ import annotations

import polars as pl
import pyarrow as pa
from pydantic import Field

from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter
from curate.core.config import Strict


@register_stage
class CaptionLengthStage(RowFilter):
    """Drops captions longer than ``max_chars``."""

    name = "caption_length"
    columns = {"caption_chars": "characters in the caption"}

    class Params(Strict):
        max_chars: int = Field(20, ge=1, description="longest caption kept")

    def value_fields(self):
        return [pa.field("caption_chars", pa.int32())]

    def measure(self, ctx, rows):
        return Measured({"caption_chars": [len(c or "") for c in ctx.column("caption", rows)]})

    def rules(self):
        return [(pl.col("caption_chars") > self.params.max_chars, "caption:too_long")]
'''

CHECK = '''
import curate, json
from curate.runner.registry import available_stages, get_stage_class
from curate.runner.memory import run_in_memory
from curate.reference_docs import PAGES
assert curate.__file__.startswith(__import__("sys").argv[1]), curate.__file__
cls = get_stage_class("caption_length")
import io
from PIL import Image
buf = io.BytesIO(); Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
t = run_in_memory(cls(cls.Params(max_chars=10)), [{"txt": "short one", "jpg": buf.getvalue()},
                                                  {"txt": "a much longer caption", "jpg": buf.getvalue()}])
print(json.dumps({"stages": available_stages(), "keep": t.column("keep_caption_length").to_pylist(),
                  "reasons": t.column("reason_caption_length").to_pylist(),
                  "docs": "## `caption_length`" in PAGES["stages.md"]() and "caption_chars" in PAGES["columns.md"]()}))
'''


def test_a_stage_file_is_all_it_takes(tmp_path: Path):
    import json

    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "curate", copy / "curate", ignore=ignore)
    shutil.copy(ROOT / "Makefile", copy / "Makefile")
    (copy / "curate" / "stages" / "caption_length.py").write_text(STAGE)
    env = dict(os.environ, PYTHONPATH=str(copy))
    r = subprocess.run([sys.executable, "-c", CHECK, str(copy)], capture_output=True, text=True, env=env, cwd=copy,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "caption_length" in out["stages"] and out["docs"]
    assert out["keep"] == [True, False] and out["reasons"] == [None, "caption:too_long"]
    r = subprocess.run([sys.executable, "-m", "curate.cli", "stages", "caption_length"], capture_output=True,
                       text=True, env=env, cwd=copy, timeout=120)
    assert r.returncode == 0 and "max_chars" in r.stdout, r.stderr[-2000:]
    r = subprocess.run(["make", "--no-print-directory", "-s", "-C", str(copy), "help"], capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")})
    assert " caption_length " in r.stdout or r.stdout.rstrip().endswith("caption_length"), r.stdout[-800:]
