"""The HTML report in a real headless browser (Debian's chromium, installed by `make test`): the
page renders, every image loads, the console is clean; two runs compare side by side."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from curate.runner.pipeline import run_pipeline
from curate.report.html import write_comparison, write_report
from tests.conftest import make_config, make_pipeline

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium not installed (`make test` installs it)")


def render(page: Path, tmp_path: Path) -> tuple[str, str]:
    """(DOM after load, browser log) of ``page``."""
    r = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                        "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


@pytest.mark.slow
def test_report_renders_with_every_image_and_no_console_error(pool: Path, tmp_path: Path):
    pipe = make_pipeline(("text", {}), ("image", {"max_dominant_share": 0.97, "min_blur_var": 20.0}),
                         ("dedup", {"keep": "smallest_uid"}))
    work = tmp_path / "w"
    assert run_pipeline(pipe, make_config(str(pool / "*.tar"), work)).ok
    page = write_report(work)
    dom, log = render(page, tmp_path)
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images > 10 and 'data-broken="0"' in dom, re.search(r"<body[^>]*>", dom).group(0)
    assert "CONSOLE" not in log and "Uncaught" not in log, log[-2000:]
    for heading in ("Funnel", "Stages and parameters", "Kept samples", "Dropped samples"):
        assert heading in dom
    assert dom.count("<h2>Funnel</h2>") == 1
    assert "duplicate of" in dom and "uid " in dom  # tiles explain themselves

    other = tmp_path / "w2"
    assert run_pipeline(make_pipeline(("text", {"min_words": 5})), make_config(str(pool / "*.tar"), other)).ok
    cmp_page = write_comparison(work, other)
    dom, log = render(cmp_page, tmp_path)
    assert "Funnel A" in dom and "Funnel B" in dom and "kept by both" in dom
    assert "CONSOLE" not in log and "Uncaught" not in log

