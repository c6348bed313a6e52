"""Effects along training (train.eval_at or train.eval_at_steps): the contrasts at each point and each
effect's slope over training, a run's points being repeated measures of that run. Points are placed by
share of the schedule (``progress``) or, where the runs carry it (``step``: train.eval_at_steps, or
steps_per_condition: equal), by optimizer step. Prompt-only runs are not along training: left out."""
from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation import stats
from evaluation.contrasts import CONTRAST_COLUMNS, contrasts, corrected, prepare_runs, references, wide
from evaluation.stats import nanmean_rows

# ----------------------------------------------------------------------------- along training

TREND_COLUMNS = ["model", "condition", "kind", "value", "suite", "metric", "judge", "reference", "primary",
                 "family", "points", "per", "n_seeds", "n_items", "slope", "se", "df", "ci_lo", "ci_hi", "p_value",
                 "p_holm", "significant", "inference"]


def axis(runs: pd.DataFrame) -> str:
    """The column that places the points: "step" where every trained run carries one, else "progress"."""
    trained = runs[~runs["kind"].isin(["base", "prompt"])]
    return "step" if "step" in runs.columns and len(trained) and trained["step"].notna().all() else "progress"


def points_along_training(runs: pd.DataFrame, scores: pd.DataFrame, alpha: float = 0.05,
                          primary_judges: dict[str, str] | None = None) -> pd.DataFrame:
    """The contrasts at each point along training (``progress`` and ``step`` columns), each training
    run counted once per point: :func:`contrasts` on the base runs and the trained runs at that point.

    ``runs`` has a ``progress`` column: a trained run's adapter at that share of its schedule
    (1 = the end; the base model 0), and may have a ``step`` column (its optimizer step), which then
    places the points (:func:`axis`; ``progress`` is then each condition's share at that step).
    Empty with fewer than two points."""
    x = axis(runs) if "progress" in runs.columns else "progress"
    base, trained = runs[runs["kind"] == "base"], runs[~runs["kind"].isin(["base", "prompt"])]
    points = sorted(trained[x].unique()) if "progress" in runs.columns else []
    if len(points) < 2:
        return pd.DataFrame(columns=[*CONTRAST_COLUMNS, "progress", "step"])
    out = []
    for p in points:
        at = trained[trained[x] == p]
        c = contrasts(pd.concat([base, at]), scores, alpha, primary_judges)
        share = at.groupby("condition")["progress"].first()  # at a step, each condition's own share
        out.append(c.assign(progress=c["condition"].map(share).astype(float), step=p if x == "step" else np.nan))
    return pd.concat(out, ignore_index=True)


def trend_along_training(runs: pd.DataFrame, scores: pd.DataFrame, alpha: float = 0.05,
                         primary_judges: dict[str, str] | None = None) -> pd.DataFrame:
    """The slope of each effect over training progress (dose-response), per (model, condition,
    suite, metric, judge, reference): one slope per (training run, item), from that run's own
    points, then the crossed runs × items test of the slopes (:func:`stats.crossed_test`). A run's
    points are repeated measures of one run, never separate runs: the inference replicates over
    training runs, as at the end of training. Empty with fewer than two points."""
    x = axis(runs) if "progress" in runs.columns else "progress"
    runs = runs[runs["kind"] != "prompt"]
    points = runs.loc[runs["kind"] != "base", x].unique() if "progress" in runs.columns else []
    if len(points) < 2:
        return pd.DataFrame(columns=TREND_COLUMNS)
    rows = []
    r = prepare_runs(runs)
    for model, mr in r.groupby("model", sort=True):
        vals, _ = wide(scores, list(mr["run_id"]))
        if vals.empty:
            continue
        col = {run: i for i, run in enumerate(vals.columns)}
        values = vals.to_numpy(float)
        base_m, controls = mr[mr["kind"] == "base"], mr[mr["kind"] == "control"]
        for condition, cr in mr[mr["kind"] != "base"].groupby("condition", sort=True):
            kind, value = cr["kind"].iloc[0], cr["value"].iloc[0] if "value" in cr else None
            for ref_name, ref_runs in references(base_m, controls, kind, value):
                for (suite, metric, judge), pos in sorted(vals.groupby(level=[0, 1, 2]).indices.items()):
                    slopes = [_item_slopes(values[pos], col, sr, ref_runs, ref_name == "control", x)
                              for _, sr in cr.groupby("_seed_sort", sort=True)]
                    test = stats.crossed_test(np.vstack(slopes), alpha)
                    rows.append(dict(model=model, condition=condition, kind=kind,
                                     value=None if pd.isna(value) else value, suite=suite, metric=metric,
                                     judge=judge, reference=ref_name, points=len(points), per=x,
                                     **{("slope" if k == "effect" else k): v for k, v in test.as_dict().items()
                                        if k not in ("var_seed", "var_item", "var_resid")}))
    return corrected(rows, TREND_COLUMNS, primary_judges, alpha)


def _item_slopes(values: np.ndarray, col: dict[str, int], run_points: pd.DataFrame, ref_runs: pd.DataFrame,
                 same_point: bool, x_col: str = "progress") -> np.ndarray:
    """Per item, the OLS slope over `x_col` (progress, or step) of one training run's paired difference
    with its reference (controls: those at the same point and seed, else all at that point; base: the base)."""
    xs, diffs = [], []
    pts = run_points.sort_values(x_col)
    for run_id, progress, seed in zip(pts["run_id"], pts[x_col], pts["_seed"]):
        ref = ref_runs
        if same_point:
            at = ref_runs[ref_runs[x_col] == progress]
            ref = at[at["_seed"] == seed] if (at["_seed"] == seed).any() else at
        arm = nanmean_rows(values[:, [col[x] for x in ref["run_id"]]].T)
        xs.append(progress)
        diffs.append(values[:, col[run_id]] - arm)
    x = np.asarray(xs, float)
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    slopes: np.ndarray = w @ np.vstack(diffs)
    return slopes  # NaN for an item unscored at any point
