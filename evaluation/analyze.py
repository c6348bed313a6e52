"""Pure-table analysis of a value-induction study, the public face of its parts: per-run metrics and
paired contrasts against the base model and random-subset controls (``evaluation.contrasts``), the
induced × expressed co-expression matrix with a whole-matrix test (``evaluation.coexpression``),
effects along training (``evaluation.along``), and here the A/A check between control arms and the
seeds/power table.

Inputs follow ``evaluation.types``: ``runs`` has RUN_COLUMNS, ``scores`` has SCORE_COLUMNS.
Nothing here trains, generates or judges; tables in, tables out.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from evaluation import stats
from evaluation.along import TREND_COLUMNS, points_along_training, trend_along_training
from evaluation.coexpression import coexpression, coexpression_matrix, crosstalk_tests
from evaluation.contrasts import (CONTRAST_COLUMNS, EXPRESSES_PREFIX, PLANTED_SUITE, VALUES_SUITE, add_corrections,
                                  compare_arms, contrasts, family_of, mark_primary, per_run_metrics,
                                  positive_control, prepare_runs, verdicts, wide)

__all__ = [
    "per_run_metrics",
    "contrasts",
    "mark_primary",
    "family_of",
    "coexpression",
    "coexpression_matrix",
    "crosstalk_tests",
    "aa_check",
    "positive_control",
    "power_table",
    "verdicts",
    "points_along_training",
    "trend_along_training",
    "CONTRAST_COLUMNS",
    "TREND_COLUMNS",
    "VALUES_SUITE",
    "EXPRESSES_PREFIX",
    "PLANTED_SUITE",
]


def _only(values: Iterable[Any], what: str) -> Any:
    u = sorted(set(values))
    if len(u) != 1:
        raise ValueError(f"several {what}s present ({u}); pass {what}= explicitly")
    return u[0]


# ----------------------------------------------------------------------------- A/A check

def aa_check(runs: pd.DataFrame, scores: pd.DataFrame, condition_a: str, condition_b: str,
             model: str | None = None, alpha: float = 0.05, primary_judges: dict[str, str] | None = None) -> dict[str, Any]:
    """A/A check: compare two control conditions (paired by seed) on every (suite, metric, judge).

    Both arms are trained on random subsets, so every null hypothesis is true. The comparisons
    are tested and corrected exactly as :func:`contrasts` does (crossed test; Holm within each
    family of primary-judge rows), so the share of A/A checks with any significant comparison
    estimates the family-wise false-positive rate that the study's contrasts face. Returns
    n_tests, n_significant, n_significant_uncorrected, any_significant and the ``table``.
    """
    r = prepare_runs(runs)
    if model is None:
        model = _only(r.loc[r["condition"].isin([condition_a, condition_b]), "model"], "model")
    r = r[r["model"] == model]
    ra, rb = r[r["condition"] == condition_a], r[r["condition"] == condition_b]
    if ra.empty or rb.empty:
        raise ValueError(f"no runs for {condition_a!r} or {condition_b!r} of model {model!r}")
    vals, exists = wide(scores, list(ra["run_id"]) + list(rb["run_id"]))
    table = pd.DataFrame(compare_arms(vals, exists, ra, rb, True, alpha))
    if table.empty:
        return dict(model=model, n_tests=0, n_significant=0, n_significant_uncorrected=0,
                    any_significant=False, table=table)
    table["primary"] = mark_primary(table, primary_judges)
    table["family"] = [family_of("control", s) for s in table["suite"]]
    table = add_corrections(table, ["family"], alpha).rename(columns={"p_holm": "p_adj"})
    prim = table[table["primary"]]
    n_sig = int(prim["significant"].sum())
    return dict(model=model, alpha=alpha, n_tests=int(prim["p_value"].notna().sum()), n_significant=n_sig,
                n_significant_uncorrected=int((prim["p_value"] < alpha).sum()),
                any_significant=n_sig > 0, table=table)


# ----------------------------------------------------------------------------- seeds and power

def power_table(contrasts_df: pd.DataFrame, target_halfwidth: float | None = None,
                min_effect: float | None = None, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Per primary contrast: the CI half-width now, the floor no number of seeds goes below (the
    item × condition term), the runs needed for a target half-width, and the power now and runs
    needed against the smallest effect of interest ``min_effect`` (never the observed effect,
    which would make every observed effect look detectable)."""
    if contrasts_df is None or contrasts_df.empty:
        return pd.DataFrame()
    rows = []
    for r in contrasts_df[contrasts_df["primary"]].itertuples():
        s, i = int(r.n_seeds), int(r.n_items)
        comps = (r.var_seed, r.var_item, r.var_resid)
        planned = s >= 2 and i >= 2 and all(np.isfinite(comps))
        floor = stats.halfwidth_floor(r.var_item, i, alpha) if planned else math.nan
        row = {"model": r.model, "condition": r.condition, "reference": r.reference, "suite": r.suite,
               "metric": r.metric, "judge": r.judge, "n_seeds": s, "n_items": i,
               "ci_halfwidth": (r.ci_hi - r.ci_lo) / 2, "halfwidth_floor": floor,
               "seeds_for_target": None, "power_now": math.nan, "seeds_for_power": None, "note": ""}
        if not planned:
            row["note"] = "needs 2+ runs to estimate run-to-run variance"
        else:
            if target_halfwidth:
                row["seeds_for_target"] = stats.seeds_for_halfwidth(*comps, i, target_halfwidth, alpha)
                if floor >= target_halfwidth:
                    row["note"] = "more items, not more seeds: the item floor is above the target"
            if min_effect:
                row["power_now"] = stats.power_at(min_effect, *comps, i, s, alpha)
                row["seeds_for_power"] = stats.seeds_for_power(min_effect, *comps, i, alpha, power)
                if row["seeds_for_power"] is None:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + \
                        f"no number of seeds reaches {power:.0%} power for {min_effect}: more items"
        rows.append(row)
    return pd.DataFrame(rows)
