"""A study's whole analysis from its tables: contrasts, per-run metrics, power, the A/A check and
the adapter check. Pure (no Ray, no store), so it is tested on plain tables."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from evaluation.analyze import (aa_check, contrasts, per_run_metrics, points_along_training, power_table,
                                 trend_along_training)
from evaluation.sanity import adapter_check


@dataclass(frozen=True)
class AnalysisSettings:
    alpha: float = 0.05
    power: float = 0.8
    min_effect: float | None = None
    target_halfwidth: float | None = None        # seeds.adaptive's target, for the power table
    primary_judges: dict[str, str] | None = None
    aa_check: bool = False                        # control-0 against control-1 per model (per value, if matched)


@dataclass(frozen=True)
class Analysis:
    contrasts: pd.DataFrame
    metrics: pd.DataFrame
    power: pd.DataFrame
    adapters: pd.DataFrame                   # evaluation.sanity.adapter_check: did each adapter change its model
    aa: pd.DataFrame | None = None           # per model: tests and how many came out significant
    aa_detail: pd.DataFrame | None = None    # every A/A comparison
    along: pd.DataFrame | None = None        # effects at each train.eval_at point (runs as units there)
    trend: pd.DataFrame | None = None        # the effects' slopes over training (a run's points: repeated measures)


def aa_pairs(runs: pd.DataFrame) -> list[tuple[str | None, str, str]]:
    """(matched value, arm A, arm B) of the A/A checks: control-0 against control-1, or with
    per-value controls (a ``match`` column) control-<v>-0 against control-<v>-1 for each value."""
    c = runs[runs["kind"] == "control"]
    if "match" not in c.columns or c["match"].isna().all():
        return [(None, "control-0", "control-1")]
    return [(v, f"control-{v}-0", f"control-{v}-1") for v in c["match"].dropna().unique()]


def final_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the headline analysis and the report use: base models and fully trained runs, not
    the adapters saved part-way through training (train.eval_at), which only the along-training
    tables read."""
    if "progress" not in runs.columns:
        return runs
    return runs[(runs["kind"] == "base") | (runs["progress"] == 1.0)]


def analyze_study(runs: pd.DataFrame, scores: pd.DataFrame, generations: pd.DataFrame,
                  s: AnalysisSettings, probe: pd.DataFrame | None = None) -> Analysis:
    """runs: RUN_COLUMNS (+ progress: train.eval_at); scores: SCORE_COLUMNS; generations: run_id,
    suite, item_id, response; probe: the adapter probe's log-probs (evaluation.sanity.PROBE_COLUMNS;
    None: every trained run unchecked). Everything but the along-training tables uses the final runs only."""
    along = trend = None
    if "progress" in runs.columns:
        along = points_along_training(runs, scores, s.alpha, s.primary_judges)
        trend = trend_along_training(runs, scores, s.alpha, s.primary_judges)
        runs = final_runs(runs)
    con = contrasts(runs, scores, alpha=s.alpha, primary_judges=s.primary_judges)
    aa = aa_detail = None
    if s.aa_check:
        rows, tables = [], []
        for model in runs["model"].unique():  # spec order
            for match, a, b in aa_pairs(runs[runs["model"] == model]):
                res = aa_check(runs, scores, a, b, model=model, alpha=s.alpha, primary_judges=s.primary_judges)
                rows.append({"model": model, "match": match,
                             **{k: v for k, v in res.items() if not isinstance(v, pd.DataFrame)}})
                t = res["table"]
                tables.append(t.reindex(columns=["model", "match", *t.columns]).assign(model=model, match=match))
        aa, aa_detail = pd.DataFrame(rows), pd.concat(tables, ignore_index=True)
        if aa["match"].isna().all():  # pooled controls: the tables as they always were
            aa, aa_detail = aa.drop(columns="match"), aa_detail.drop(columns="match")
    return Analysis(contrasts=con, metrics=per_run_metrics(scores),
                    power=power_table(con, s.target_halfwidth, s.min_effect, s.alpha, s.power),
                    adapters=adapter_check(probe, generations, runs), aa=aa, aa_detail=aa_detail,
                    along=along if along is not None and len(along) else None,
                    trend=trend if trend is not None and len(trend) else None)
