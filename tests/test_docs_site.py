"""The documentation site: it builds offline and strict (no broken link, every page in the nav),
opens in headless Chromium with its navigation and search box, and the README's commands are ones
the CLI accepts."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"),
                        "-d", str(out)], capture_output=True, text=True, timeout=300,
                       env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(out)})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_the_site_builds_strict_with_every_page_in_the_nav(site: Path):
    pages = {p.relative_to(ROOT / "docs" / "pages").with_suffix("") for p in (ROOT / "docs" / "pages").rglob("*.md")}
    built = {p.parent.relative_to(site) if p.parent != site else Path("index") for p in site.rglob("index.html")}
    built = {Path(str(b).removesuffix("/index")) for b in built}
    missing = {p for p in pages if p not in built and not (p.name == "index" and p.parent in built)}
    assert not missing, missing
    nav = (ROOT / "docs" / "mkdocs.yml").read_text()
    assert not [p for p in pages if f"{p}.md" not in nav], "a page missing from the nav"
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "summarize" in api and "combine_parts" in api  # mkdocstrings rendered the stage contract


def test_a_datacomp_baseline_on_a_bucket_is_two_clicks_from_home(site: Path):
    home = (site / "index.html").read_text()
    assert 'href="how-to/datacomp-on-your-bucket/"' in home
    page = (site / "how-to" / "datacomp-on-your-bucket" / "index.html").read_text()
    for recipe in ("datacomp_basic", "datacomp_text_based", "datacomp_clip_score_metadata", "datacomp_image_based"):
        assert f"pipelines/{recipe}.yaml" in page


@pytest.mark.skipif(BROWSER is None, reason="chromium not installed (`make test` installs it)")
def test_the_site_opens_in_a_browser_with_navigation_and_search(site: Path, tmp_path: Path):
    shot = tmp_path / "home.png"
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--virtual-time-budget=5000"]
    r = subprocess.run([*args, "--dump-dom", (site / "index.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'class="md-nav' in r.stdout and "md-search__input" in r.stdout
    assert "DataComp's baselines on your bucket" in r.stdout
    r = subprocess.run([*args, "--window-size=1200,900", f"--screenshot={shot}", (site / "index.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from PIL import Image

    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 100 and len(set(im.resize((60, 45)).getdata())) > 10  # drawn, not a blank page


def test_every_file_the_readme_links_to_is_in_the_repository():
    """The README stands alone: each relative link names a committed file, not a generated page."""
    text = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    assert links and [t for t in links if not (ROOT / t).exists()] == []


def test_every_command_the_readme_names_accepts_help():
    """Each `curate COMMAND ...` the README shows is a command, and each of its --options one that
    command's --help lists."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    uses = re.findall(r"curate (models fetch|run|stats|report|export|ingest|stages|synth|train|eval)\b([^\n`]*)", text)
    assert {"run", "stats", "export", "ingest", "report", "stages"} <= {c for c, _ in uses}
    helps: dict[str, str] = {}
    for cmd, rest in uses:
        if cmd not in helps:
            r = subprocess.run([str(ROOT / ".venv" / "bin" / "curate"), *cmd.split(), "--help"], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0 and "usage: curate" in r.stdout, (cmd, r.stderr[-500:])
            helps[cmd] = r.stdout
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest.split("#")[0]):
            assert flag in helps[cmd], (cmd, flag)
