"""A study's whole analysis from its tables: contrasts, per-run metrics, power, the A/A check and
the adapter check (`analyze_study`), then everything its report shows (`build_report_inputs`). Pure
(no Ray, no store), so it is tested on plain tables."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from evaluation.analyze import (aa_check, contrasts, per_run_metrics, points_along_training, power_table,
                                 trend_along_training)
from evaluation.claims import claims_table
from evaluation.coexpression import coexpression, crosstalk_tests
from evaluation.contrasts import positive_control, verdicts
from evaluation.equivalence import with_equivalence
from evaluation.pooled import pool_contrasts
from evaluation.report_inputs import ReportInputs, StudyInfo, StudyTables, Verdict
from evaluation.sanity import adapter_check, adapter_verdicts
from evaluation.stage_test import stage_test


@dataclass(frozen=True)
class AnalysisSettings:
    alpha: float = 0.05
    power: float = 0.8
    min_effect: float | None = None
    target_halfwidth: float | None = None        # seeds.adaptive's target, for the power table
    primary_judges: dict[str, str] | None = None
    aa_check: bool = False                        # control-0 against control-1 per model (per value, if matched)
    equivalence_margin: dict[str, float] | None = None  # analyze.equivalence_margin (None: evaluation.equivalence's)


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
    pooled: pd.DataFrame | None = None       # evaluation.pooled: each contrast across models (≥ 2 models)
    stage_test: pd.DataFrame | None = None   # evaluation.stage_test: own expression, instruct vs the others


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
    con = with_equivalence(contrasts(runs, scores, alpha=s.alpha, primary_judges=s.primary_judges),
                           s.equivalence_margin, s.alpha)
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
                    trend=trend if trend is not None and len(trend) else None, **across_models(runs, con, s))


def per_model(runs: pd.DataFrame, column: str) -> dict[str, str | None]:
    """model → the runs table's ``column`` (models[i].stage or .family); {} without that column."""
    if column not in runs.columns or runs.empty:
        return {}
    col = runs.drop_duplicates("model").set_index("model")[column]
    return {str(m): (None if pd.isna(v) else str(v)) for m, v in col.items()}


def across_models(runs: pd.DataFrame, con: pd.DataFrame, s: AnalysisSettings) -> dict[str, pd.DataFrame | None]:
    """The pooled contrasts (with equivalence) and the value × stage test; None where not measured."""
    pooled = with_equivalence(pool_contrasts(con, s.alpha, per_model(runs, "family")), s.equivalence_margin, s.alpha)
    stages = {m: v for m, v in per_model(runs, "stage").items() if v is not None}
    st = stage_test(con, stages, s.alpha)
    return {"pooled": pooled if len(pooled) else None, "stage_test": st if len(st) else None}


# ----------------------------------------------------------------------------- what the report shows

_STAGES = ("base", "sft", "instruct")  # models[i].stage, in the order the report groups results


def model_stages(runs: pd.DataFrame | None) -> dict[str, str] | None:
    """model → stage when the study's models span more than one stage; None: results are not grouped."""
    if runs is None or "stage" not in runs.columns:
        return None
    st = runs.drop_duplicates("model").set_index("model")["stage"].astype(str)
    return st.to_dict() if st.nunique() > 1 else None


def by_stage(df: pd.DataFrame, stages: dict[str, str]) -> pd.DataFrame:
    """A "stage" column first and rows ordered base → sft → instruct (their order kept within a stage)."""
    df = df.assign(stage=df["model"].map(stages))
    rank = df["stage"].map({s: i for i, s in enumerate(_STAGES)}).fillna(len(_STAGES)).to_numpy()
    return df.iloc[np.argsort(rank, kind="stable")][["stage"] + [c for c in df.columns if c != "stage"]]


def short_judges(c: pd.DataFrame) -> pd.DataFrame:
    """Judge names without their model/version suffix ("llm:smollm2-135m@vllm-0.32.0" → "llm") for
    result tables, unless that would merge two judges; the provenance table keeps the full names."""
    full = pd.Series(c["judge"].astype(str).unique())
    short = full.str.split(":").str[0]
    if short.nunique() < len(full):
        return c
    return c.assign(judge=c["judge"].astype(str).map(dict(zip(full, short))))


def condition_summary(runs: pd.DataFrame | None, prm: pd.DataFrame) -> pd.DataFrame | None:
    """Mean and seed SD of each metric per (model, condition): base/control/value side by side."""
    if prm.empty or runs is None or runs.empty:
        return None
    m = prm.merge(runs[["run_id", "model", "condition", "kind"]], on="run_id", how="inner")
    if m.empty:
        return None
    g = m.groupby(["suite", "metric", "judge", "model", "kind", "condition"], sort=True)["mean"]
    return g.agg(n_runs="count", mean="mean", sd_across_seeds="std").reset_index()


def judge_provenance(scores: pd.DataFrame | None, prm: pd.DataFrame) -> pd.DataFrame | None:
    """Per (suite, metric, judge, full name): how many runs and items it scored."""
    if scores is None or len(scores) == 0 or prm.empty:
        return None
    return (prm.groupby(["suite", "metric", "judge"], sort=True)
               .agg(n_runs=("run_id", "nunique"), n_scored=("n_scored", "sum"),
                    n_unscored=("n_unscored", "sum")).reset_index())


def _along(tables: StudyTables) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The headline verdicts at each train.eval_at point and the primary slopes, judges shortened."""
    points, trend = tables.along, tables.trend
    if not isinstance(points, pd.DataFrame) or points.empty:
        return None, None
    t = None
    if isinstance(trend, pd.DataFrame) and not trend.empty:
        t = short_judges(trend[trend["primary"]])[
            ["model", "condition", "suite", "metric", "reference", "points", "n_seeds", "slope", "ci_lo", "ci_hi",
             "p_value", "p_holm", "significant"]]
    return short_judges(verdicts(points)), t


def _per_run(runs: pd.DataFrame | None, prm: pd.DataFrame) -> pd.DataFrame | None:
    if prm.empty:
        return None
    return prm.merge(runs[["run_id", "model", "condition", "seed"]], on="run_id", how="left") if runs is not None \
        else prm


def build_report_inputs(runs: pd.DataFrame | None, scores: pd.DataFrame | None, contrasts_df: pd.DataFrame | None,
                        info: StudyInfo | None = None, tables: StudyTables | None = None) -> ReportInputs:
    """Everything the report shows, computed here so that `evaluation.report.render` only formats.

    runs: the final runs (``final_runs``; a ``stage`` column with more than one stage groups the
    results base → sft → instruct); scores: theirs; contrasts_df: ``Analysis.contrasts``."""
    info, tables = info or StudyInfo(), tables or StudyTables()
    runs = runs if isinstance(runs, pd.DataFrame) and not runs.empty else None
    prm = per_run_metrics(scores)
    stages = model_stages(runs)
    con = co = crosstalk = claims = None
    pcs: list[dict[str, Any]] = []
    if isinstance(contrasts_df, pd.DataFrame) and not contrasts_df.empty:
        con = short_judges(contrasts_df)
        con = by_stage(con, stages) if stages else con
        co = coexpression(con, alpha=info.alpha)
        tests = crosstalk_tests(co, info.alpha)
        crosstalk = pd.DataFrame(tests) if tests else None
        claims = claims_table(con, coexpression=co, crosstalk=tests,
                              positive_values=list(info.positive_values) if info.positive_values is not None else None,
                              pooled=tables.pooled, stage_test=tables.stage_test,
                              stages={m: v for m, v in per_model(runs, "stage").items() if v is not None}
                              if runs is not None else None)
        pcs = positive_control(con, info.alpha)
    summary = condition_summary(runs, prm)
    points, trend = _along(tables)
    return ReportInputs(
        info=info, generated=_dt.datetime.now().isoformat(timespec="seconds"), runs=runs, contrasts=con,
        sensitivity=tuple(Verdict("detected" if p["detected"] else "missed", p["line"]) for p in pcs),
        adapter_verdicts=tuple(Verdict(v["status"], v["line"]) for v in adapter_verdicts(tables.adapters)),
        claims=claims, coexpression=co if co is not None and not co.empty else None, crosstalk=crosstalk,
        along_points=points, along_trend=trend, per_run=_per_run(runs, prm),
        provenance=judge_provenance(scores, prm),
        condition_summary=by_stage(summary, stages) if stages and summary is not None else summary, tables=tables)
