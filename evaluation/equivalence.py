"""Equivalence for "stays stable" claims: two one-sided tests (TOST; Schuirmann 1987) of each
contrast against a margin ±m on its metric's scale (analyze.equivalence_margin).

A non-significant change is no evidence of stability: more noise would make it easier to
"confirm". TOST asks the opposite question, whether the change is shown to lie within ±m:
p_tost = max(P(T ≥ (effect + m)/se), P(T ≤ (effect − m)/se)) on the contrast's own t (its df), and
p_tost < α exactly when the 1 − 2α CI lies inside (−m, +m). Each contrast is tested at α; "every
contrast equivalent" is then an intersection–union test at α with no multiplicity correction
(Berger 1982), while a count "equivalent in 5 of 6" is descriptive.

Verdict per contrast: "changed" (significant after correction: the study's own verdict),
"equivalent within ±m", "not shown equivalent", or "" where no margin covers the metric or the
contrast has one run (run-to-run variance unmeasured: not tested). Tables in, a table out.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy import special

__all__ = ["DEFAULT_MARGINS", "EQUIVALENCE_COLUMNS", "margin_for", "tost_p", "with_equivalence"]

# QA accuracy: ±0.05 absolute (5 accuracy points). Our choice, no source: the paper says only
# "remain largely stable". 0.05 is the binomial SD of an accuracy near 50% on a 100-item set
# (√(.25/100)), so a smaller change is within what resampling the items alone would move a score,
# and a change of more than 5 points is one a reader would no longer call "stable". A study sets
# its own margin per metric (analyze.equivalence_margin); other metrics have none by default.
DEFAULT_MARGINS: dict[str, float] = {"qa/acc": 0.05}

EQUIVALENCE_COLUMNS = ["equivalence_margin", "p_tost", "equivalence"]


def margin_for(suite: str, metric: str, margins: Mapping[str, float]) -> float:
    """The margin of "suite/metric": the first fnmatch pattern (or suite name) that matches; NaN: none."""
    for pattern, m in margins.items():
        if pattern == suite or fnmatch(f"{suite}/{metric}", pattern):
            return float(m)
    return float("nan")


def tost_p(effect: Any, se: Any, df: Any, margin: Any) -> np.ndarray:
    """TOST p-values, elementwise; NaN where an input is missing. se = 0 (every paired difference
    identical) gives 1: no variation was measured, which shows nothing about how far the arms could
    differ (a QA set every run answers wrongly on 20 items bounds neither arm's accuracy near 0)."""
    effect, se, df, margin = (np.asarray(x, float) for x in (effect, se, df, margin))
    ok = np.isfinite(effect) & np.isfinite(se) & (se >= 0) & np.isfinite(margin) & ~np.isnan(df)
    pos = ok & (se > 0)
    s, d = np.where(pos, se, 1.0), np.where(pos, df, 1.0)
    lower = special.stdtr(d, -(effect + margin) / s)   # H0: effect ≤ −m
    upper = special.stdtr(d, (effect - margin) / s)    # H0: effect ≥ +m
    return np.where(pos, np.maximum(lower, upper), np.where(ok, 1.0, np.nan))


def with_equivalence(df: pd.DataFrame, margins: Mapping[str, float] | None = None,
                     alpha: float = 0.05) -> pd.DataFrame:
    """``df`` (a contrasts or pooled table: suite, metric, effect, se, df, p_value, significant) with
    EQUIVALENCE_COLUMNS added; ``margins``: "suite/metric" pattern → margin (None: DEFAULT_MARGINS)."""
    margins = DEFAULT_MARGINS if margins is None else margins
    if df.empty:
        return df.assign(**{c: pd.Series(dtype=float if c != "equivalence" else object)
                            for c in EQUIVALENCE_COLUMNS})
    m = np.array([margin_for(s, x, margins) for s, x in zip(df["suite"], df["metric"])], float)
    tested = np.isfinite(m) & np.isfinite(df["p_value"].to_numpy(float))
    p = np.where(tested, tost_p(df["effect"], df["se"], df["df"], m), np.nan)
    sig = df["significant"].fillna(False).astype(bool).to_numpy()
    verdict = np.where(~tested, "", np.where(sig, "changed", np.where(p < alpha, [
        f"equivalent within ±{x:g}" for x in m], "not shown equivalent")))
    return df.assign(equivalence_margin=m, p_tost=p, equivalence=verdict)
