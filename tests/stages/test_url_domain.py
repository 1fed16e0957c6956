"""The example stage of docs/pages/how-to/write-a-stage.md: a source-domain blocklist, tested on in-memory samples."""
from __future__ import annotations

from pathlib import Path

import pytest

from curate.core.config import ConfigError
from curate.runner.pipeline import preflight
from curate.io.layout import WorkDir
from curate.runner.memory import run_in_memory
from curate.stages.url_domain import UrlDomainStage, url_domain
from curate.core.config import RunConfig
from tests.conftest import jpeg_bytes


def _run(urls: list, **params) -> list[dict]:
    jpg = jpeg_bytes()
    samples = [{"txt": "a red circle", "jpg": jpg} | ({"json": {"url": u}} if u is not ...  else {}) for u in urls]
    return run_in_memory(UrlDomainStage(UrlDomainStage.Params(**params)), samples).to_pylist()


def test_listed_domains_and_their_subdomains_are_dropped():
    rows = _run(["https://www.Example.com/a.jpg", "http://cdn.img.example.com/b", "https://example.com.evil.org/c",
                 "https://other.org/d"], blocklist=["example.com"])
    assert [r["domain"] for r in rows] == ["example.com", "cdn.img.example.com", "example.com.evil.org", "other.org"]
    assert [r["reason_url_domain"] for r in rows] == ["url:blocked_domain", "url:blocked_domain", None, None]


def test_broken_urls_are_kept_or_dropped_by_rule_never_crash(tmp_path: Path):
    listed = tmp_path / "block.txt"
    listed.write_text("# opt-outs\nfoo.net\n\nbar.org  # trailing comment\n")
    urls = [None, 42, "", "not a url", "http://[::1", "ftp://FOO.net/x", ..., "https://bar.org"]
    rows = _run(urls, blocklist_file=str(listed))
    assert [r["reason_url_domain"] for r in rows] == [None, None, None, None, None, "url:blocked_domain", None,
                                                      "url:blocked_domain"]
    strict = _run(urls, blocklist_file=str(listed), require_url=True)
    assert [r["reason_url_domain"] for r in strict][:5] == ["url:missing"] * 5
    assert strict[6]["reason_url_domain"] == "url:missing"  # no json at all


def test_a_missing_blocklist_file_fails_preflight(tmp_path: Path):
    st = UrlDomainStage(UrlDomainStage.Params(blocklist_file=str(tmp_path / "nope.txt")))  # builds: read lazily
    with pytest.raises(ConfigError, match="blocklist_file .*nope.txt' not found"):
        preflight([st], RunConfig(), [], WorkDir.at(tmp_path / "w"))


def test_domain_parsing():
    assert url_domain("HTTPS://WWW.A.B.com:8080/x?y") == "a.b.com"
    assert url_domain("www.example.com/no-scheme") is None  # no scheme: no host to trust
