"""caption_pii: personal data in captions, kind by kind, on a table of positive and negative
captions (numbers that are dates, prices, product codes or barcodes must not match); spans,
redaction, the drop rule, mistakes named before any work."""
from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from curate.algorithms.pii import KINDS, TAGS, find_pii, redact
from curate.core.config import ConfigError
from curate.runner.pipeline import run_pipeline
from tests.conftest import jpeg_bytes, make_config, make_pipeline, write_tar

TABLE = Path(__file__).parents[1] / "data" / "pii_captions.tsv"
ROWS = list(csv.DictReader(TABLE.open(encoding="utf-8"), delimiter="\t"))


def test_the_table_holds_every_kind_and_negatives():
    counts = {k: sum(r["expect"] == k for r in ROWS) for k in (*KINDS, "none")}
    assert all(n >= 3 for n in counts.values()) and counts["none"] >= 20, counts


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['expect']}:{r['text'][:40]}" for r in ROWS])
def test_each_caption_of_the_table(row: dict):
    spans = find_pii(row["text"])
    assert sorted({s.kind for s in spans}) == ([] if row["expect"] == "none" else [row["expect"]])
    redacted = redact(row["text"], spans)
    for s in spans:  # the redacted caption holds the tag, not the data
        assert TAGS[s.kind] in redacted and row["text"][s.start:s.end] not in redacted


def test_spans_are_exact_and_redaction_keeps_the_rest():
    text = "Jane (jane.doe@example.com, +44 20 7946 0958) at the beach"
    spans = find_pii(text)
    assert [(s.kind, text[s.start:s.end]) for s in spans] == [("email", "jane.doe@example.com"),
                                                             ("phone", "+44 20 7946 0958")]
    assert redact(text, spans) == "Jane (<EMAIL>, <PHONE>) at the beach"
    assert redact(text, [{"kind": s.kind, "start": s.start, "end": s.end} for s in spans]) == redact(text, spans)
    assert find_pii(text, kinds=("phone",))[0].kind == "phone" and len(find_pii(text, kinds=("phone",))) == 1
    assert find_pii(None) == [] and find_pii("") == []


@pytest.fixture(scope="module")
def pii_pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("piipool")
    captions = {"clean": "a red car parked on a quiet street", "mail": "portrait by jane.doe@example.com",
                "card": "my card 4111 1111 1111 1111 and email bob@example.org",
                "sku": "stainless pot SKU 12345678901, 2023-10-15"}
    members = []
    for key, cap in captions.items():
        members += [(f"{key}.jpg", jpeg_bytes()), (f"{key}.txt", cap.encode())]
    write_tar(out / "00000.tar", members)
    return out


def _table(work: Path) -> dict[str, dict]:
    t = pl.read_parquet(work / "caption_pii" / "*.parquet").join(
        pl.read_parquet(work / "index" / "*.parquet", columns=["uid", "key"]), on="uid")
    return {r["key"]: r for r in t.to_dicts()}


def test_the_stage_writes_kinds_and_spans_and_drops_only_what_it_is_told(pii_pool: Path, tmp_path: Path):
    s = run_pipeline(make_pipeline(("caption_pii", {})), make_config(str(pii_pool / "*.tar"), tmp_path / "a"))
    assert s.ok, s.problems()
    by = _table(tmp_path / "a")
    assert by["clean"]["pii_kinds"] == [] and by["sku"]["pii_kinds"] == [] and by["sku"]["pii_spans"] == []
    assert by["mail"]["pii_kinds"] == ["email"]
    assert by["mail"]["pii_spans"] == [{"kind": "email", "start": 12, "end": 32}]
    assert by["card"]["pii_kinds"] == ["email", "card"]  # in the order of KINDS
    assert all(r["keep_caption_pii"] for r in by.values())  # annotate only by default
    s = run_pipeline(make_pipeline(("caption_pii", {"drop": ["card"]})), make_config(str(pii_pool / "*.tar"),
                                                                                   tmp_path / "b"))
    dropped = _table(tmp_path / "b")
    assert dropped["card"]["reason_caption_pii"] == "pii:card"
    assert dropped["mail"]["keep_caption_pii"] and dropped["clean"]["keep_caption_pii"]
    again = run_pipeline(make_pipeline(("caption_pii", {})), make_config(str(pii_pool / "*.tar"), tmp_path / "c"))
    assert again.ok and _table(tmp_path / "c") == by


def test_mistakes_are_named_before_any_work(pii_pool: Path, tmp_path: Path):
    for params, msg in (({"kinds": ["email", "names"]}, "unknown kind.*names"), ({"drop": ["ssn"]}, "unknown kind"),
                        ({"phone_regions": ["USA"]}, "unknown region.*USA")):
        with pytest.raises(ConfigError, match=msg):
            run_pipeline(make_pipeline(("caption_pii", params)), make_config(str(pii_pool / "*.tar"), tmp_path))
    assert not (tmp_path / "caption_pii").exists()
