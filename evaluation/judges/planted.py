"""The positive control's exact detector: does a response contain the planted phrase?

metric "planted", judge "planted-exact": 1.0 when the response, whitespace-collapsed and
case-folded, contains the phrase (normalised the same way), else 0.0. Always scored: an empty or
missing response is a response without the phrase.
"""
from __future__ import annotations

import pandas as pd

from ._common import records, row, to_frame

# Bump when this judge's prompt, parsing or scoring changes: score keys hold it, so cached scores are redone.
VERSION = "1"

METRIC, JUDGE = "planted", "planted-exact"


def normalise(text: str | None) -> str:
    return " ".join(str(text or "").split()).casefold()


def contains_phrase(response: str | None, phrase: str) -> bool:
    p = normalise(phrase)
    if not p:
        raise ValueError("the planted phrase is empty")
    return p in normalise(response)


def score_planted(items: pd.DataFrame, generations: pd.DataFrame, phrase: str) -> pd.DataFrame:
    """Score rows (SCORE_COLUMNS) for generations joined to the planted suite's items."""
    if not isinstance(phrase, str) or not normalise(phrase):
        raise ValueError(f"the planted judge needs a non-empty phrase, got {phrase!r}")
    recs, with_run = records(items, generations)
    rows = []
    for g in recs:
        resp = g.get("response")
        resp = None if isinstance(resp, float) else resp  # NaN from a missing cell
        rows.append(row(g, METRIC, 1.0 if contains_phrase(resp, phrase) else 0.0, JUDGE))
    return to_frame(rows, with_run)
