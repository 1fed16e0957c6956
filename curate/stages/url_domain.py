"""URL domain filter: drop samples whose source domain is on a blocklist (opt-outs, evaluation
sites, known junk hosts). The example stage of docs/pages/how-to/write-a-stage.md: a per-row filter
is a ``measure`` (value columns) and ``rules`` (drop conditions over them, each with a reason)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pyarrow as pa
from pydantic import Field

from curate.core.config import Strict
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule


def url_domain(url: str | None) -> str | None:
    """Lower-cased host of a URL without a leading ``www.``; None when there is no host."""
    try:
        host = urlsplit(url.strip()).hostname if url else None
    except ValueError:  # e.g. a malformed IPv6 literal
        return None
    return host.removeprefix("www.") if host else None


def parent_domains(domain: str) -> list[str]:
    """``a.b.example.com`` -> itself, ``b.example.com``, ``example.com``, ``com``."""
    parts = domain.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


@register_stage
class UrlDomainStage(RowFilter):
    """Source-domain blocklist: drops samples whose URL host (or a parent domain) is listed."""

    name = "url_domain"
    columns = {"domain": "host of the sample's URL, lower case, without www. (null: no URL)"}

    class Params(Strict):
        blocklist: list[str] = Field(default_factory=list, description="domains to drop; a domain also drops its subdomains")
        blocklist_file: str | None = Field(None, description="a text file of more domains, one a line (# comments)")
        require_url: bool = Field(False, description="drop samples without a URL")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier filters (ablations)")

    @cached_property
    def blocked(self) -> frozenset[str]:
        """The listed domains; the file is read on first use, so a missing one is reported by preflight."""
        listed = list(self.params.blocklist)
        if self.params.blocklist_file:
            lines = Path(self.params.blocklist_file).read_text().splitlines()
            listed += [ln.split("#")[0].strip() for ln in lines]
        return frozenset(d.lower().removeprefix("www.") for d in listed if d)

    def preflight(self, model_cache: str | None = None) -> list[str]:
        f = self.params.blocklist_file
        return [f"{self.stage_id}: blocklist_file {f!r} not found"] if f and not Path(f).is_file() else []

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("domain", pa.string())]

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        domains = [url_domain(u) for u in ctx.column("url", rows)]
        blocked = [d is not None and any(p in self.blocked for p in parent_domains(d)) for d in domains]
        return Measured({"domain": domains}, inputs={"blocked": blocked})

    def rules(self) -> list[Rule]:
        rules: list[Rule] = [(pl.col("blocked"), "url:blocked_domain")]
        if self.params.require_url:
            rules.insert(0, (pl.col("domain").is_null(), "url:missing"))
        return rules
