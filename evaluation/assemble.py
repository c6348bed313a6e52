"""A study's whole analysis from its tables: contrasts, per-run metrics, power, the A/A check and
the adapter sanity check. Pure (no Ray, no store), so it is tested on plain tables."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from evaluation.analyze import aa_check, contrasts, per_run_metrics, power_table
from evaluation.sanity import changed_share


@dataclass(frozen=True)
class AnalysisSettings:
    alpha: float = 0.05
    power: float = 0.8
    min_effect: float | None = None
    target_halfwidth: float | None = None        # seeds.adaptive's target, for the power table
    primary_judges: dict[str, str] | None = None
    aa_check: bool = False                        # control-0 against control-1, per model
    min_changed_share: float = 0.05


@dataclass(frozen=True)
class Analysis:
    contrasts: pd.DataFrame
    metrics: pd.DataFrame
    power: pd.DataFrame
    changed: pd.DataFrame
    aa: pd.DataFrame | None = None           # per model: tests and how many came out significant
    aa_detail: pd.DataFrame | None = None    # every A/A comparison


def analyze_study(runs: pd.DataFrame, scores: pd.DataFrame, generations: pd.DataFrame,
                  s: AnalysisSettings) -> Analysis:
    """runs: RUN_COLUMNS; scores: SCORE_COLUMNS; generations: run_id, suite, item_id, response."""
    con = contrasts(runs, scores, alpha=s.alpha, primary_judges=s.primary_judges)
    aa = aa_detail = None
    if s.aa_check:
        rows, tables = [], []
        for model in runs["model"].unique():  # spec order
            res = aa_check(runs, scores, "control-0", "control-1", model=model, alpha=s.alpha,
                           primary_judges=s.primary_judges)
            rows.append({"model": model, **{k: v for k, v in res.items() if not isinstance(v, pd.DataFrame)}})
            t = res["table"]
            tables.append(t.reindex(columns=["model", *t.columns]).assign(model=model))
        aa, aa_detail = pd.DataFrame(rows), pd.concat(tables, ignore_index=True)
    return Analysis(contrasts=con, metrics=per_run_metrics(scores),
                    power=power_table(con, s.target_halfwidth, s.min_effect, s.alpha, s.power),
                    changed=changed_share(generations, runs, s.min_changed_share), aa=aa, aa_detail=aa_detail)
