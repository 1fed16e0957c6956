"""Personal data in the caption (``algorithms/pii.py``): e-mail addresses, phone numbers, links to
a person's page, payment card numbers, IBANs and national ID numbers, each confirmed by its
check digits or by Google's phone-number rules. The spans are kept so that ``curate export
--redact-pii`` can replace them with a tag (``<EMAIL>``, ``<PHONE>``...); ``drop`` drops the
pairs whose caption holds one of the chosen kinds instead.
"""
from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from curate.algorithms.pii import KINDS, PHONE_REGIONS, find_pii
from curate.contract.base import ShardContext
from curate.contract.registry import register_stage
from curate.contract.row_filter import Measured, RowFilter, Rule
from curate.core.config import Strict

SPAN = pa.struct([pa.field("kind", pa.string()), pa.field("start", pa.int32()), pa.field("end", pa.int32())])


def _known_kinds(v: list[str]) -> list[str]:
    unknown = sorted(set(v) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown} (known: {', '.join(KINDS)})")
    return v


@register_stage
class CaptionPiiStage(RowFilter):
    """Personal data in captions: the kinds found and their character spans (for redaction)."""

    name = "caption_pii"
    version = "1"
    columns = {
        "pii_kinds": "kinds of personal data in the caption (email, phone, url_personal, card, iban, national_id), "
                     "each once",
        "pii_spans": "each finding as {kind, start, end}: character offsets in the caption, in text order",
    }

    class Params(Strict):
        kinds: list[str] = Field(default_factory=lambda: list(KINDS), description="kinds to look for")
        drop: list[str] = Field(default_factory=list, description="drop pairs whose caption holds one of these "
                                "kinds (pii:<kind>); empty: annotate only (export --redact-pii replaces them)")
        phone_regions: list[str] = Field(default_factory=lambda: list(PHONE_REGIONS), description="regions "
                                         "whose national number formats count as phone numbers (ISO 3166 codes; "
                                         "numbers in +international form are found whatever the region)")
        all_rows: bool = Field(False, description="compute for every row, not only the survivors of earlier "
                                                  "filters (a privacy pass usually wants every row)")

        _kinds = field_validator("kinds", "drop")(_known_kinds)

        @field_validator("phone_regions")
        @classmethod
        def _regions(cls, v: list[str]) -> list[str]:
            import phonenumbers

            bad = [r for r in v if r not in phonenumbers.SUPPORTED_REGIONS]
            if bad:
                raise ValueError(f"unknown region(s) {bad}: use ISO 3166 alpha-2 codes such as US, GB, IN")
            return v

    def value_fields(self) -> list[pa.Field]:
        return [pa.field("pii_kinds", pa.list_(pa.string())), pa.field("pii_spans", pa.list_(SPAN))]

    def index_columns(self) -> set[str]:
        return {"caption"}

    def describe(self) -> dict[str, Any]:
        from curate.models.versions import installed

        return {"phonenumbers": installed("phonenumbers"), "python-stdnum": installed("python-stdnum")}

    def fingerprint_extra(self, model_cache: str | None = None) -> dict[str, Any]:
        return self.describe()

    def preflight(self, model_cache: str | None = None) -> list[str]:
        try:
            import phonenumbers  # noqa: F401
            import stdnum  # noqa: F401
        except ImportError as e:
            return [f"{self.stage_id}: {e.name} is missing; it is the privacy extra: pip install 'curate[privacy]' "
                    "(make install installs it)"]
        return []

    def rules(self) -> list[Rule]:
        return [(pl.col("pii_kinds").list.contains(kind), f"pii:{kind}") for kind in KINDS if kind in self.params.drop]

    def measure(self, ctx: ShardContext, rows: list[int]) -> Measured:
        kinds, regions = tuple(self.params.kinds), tuple(self.params.phone_regions)
        found = [find_pii(c, kinds, regions) for c in ctx.column("caption", rows)]
        ctx.count("captions_with_pii", sum(bool(f) for f in found))
        return Measured({"pii_kinds": [sorted({s.kind for s in f}, key=KINDS.index) for f in found],
                         "pii_spans": [[{"kind": s.kind, "start": s.start, "end": s.end} for s in f] for f in found]})
