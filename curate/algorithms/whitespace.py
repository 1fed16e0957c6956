"""Python's whitespace, for column-wise text rules in pyarrow (RE2's ``\\s`` is ASCII only).

``str.split()`` and ``str.strip()`` treat exactly the characters ``str.isspace()`` accepts as
whitespace; the class below lists them (Python 3.11, Unicode 14; a test compares it with
``str.isspace`` over every code point), so a regex over a whole column decides as the row rule does.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

SPACE_CLASS = ("\\x{9}-\\x{d}\\x{1c}-\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}"
               "\\x{202f}\\x{205f}\\x{3000}")
ONLY_SPACE = f"^[{SPACE_CLASS}]*$"  # matches exactly the strings with ``not s.strip()``
WORD = f"[^{SPACE_CLASS}]+"  # one match per item of ``s.split()``


def split_count(texts: Sequence[str] | pa.Array) -> list[int]:
    """``[len(t.split()) for t in texts]``, counted in pyarrow."""
    arr = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    return pc.count_substring_regex(arr, WORD).to_pylist()
