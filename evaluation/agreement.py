"""A judge's agreement with a check judge on the same responses (score.check), from plain score tables.

Binary metrics (every verdict 0 or 1): precision, recall and F1 of the primary judge taking the check
judge as the reference, and Cohen's kappa. Other metrics: Spearman's ρ and Kendall's τ-b, and where
both judges give integers (a rubric), quadratically weighted kappa. An unscored verdict (an
unparseable answer) is counted as unscored by its judge, never as 0, and leaves the pair out.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats as sps

from evaluation.stats import cohen_kappa

KEYS = ("run_id", "suite", "item_id", "metric")
COLUMNS = ("suite", "metric", "judge", "kind", "sampled", "n", "unscored_primary", "unscored_check",
           "primary_yes", "check_yes", "both_yes", "precision", "recall", "f1", "kappa", "spearman", "kendall",
           "weighted_kappa")
NAN = math.nan


def judge_prefix(judge: pd.Series) -> pd.Series:
    """A judge's name without its engine ("llm:<engine>" -> "llm"): the same judge on another model."""
    return judge.astype(str).str.split(":", n=1).str[0]


def weighted_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights (w = (x − y)² over the range of the values both give);
    NaN without two distinct values or with no disagreement possible by chance."""
    cats = np.unique(np.concatenate([a, b]))
    if len(a) == 0 or len(cats) < 2:
        return NAN
    ia, ib = np.searchsorted(cats, a), np.searchsorted(cats, b)
    obs = np.zeros((len(cats), len(cats)))
    np.add.at(obs, (ia, ib), 1.0)
    obs /= obs.sum()
    exp = np.outer(obs.sum(axis=1), obs.sum(axis=0))
    w = (cats[:, None] - cats[None, :]) ** 2 / (cats[-1] - cats[0]) ** 2
    den = float((w * exp).sum())
    return 1.0 - float((w * obs).sum()) / den if den > 0 else NAN


def _rank_corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if len(a) < 2 or len(np.unique(a)) < 2 or len(np.unique(b)) < 2:
        return NAN, NAN  # a constant side has no ranks to correlate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sps.spearmanr(a, b).statistic), float(sps.kendalltau(a, b).statistic)


def _stats(a: np.ndarray, b: np.ndarray, kind: str) -> dict[str, float | int | str]:
    """The agreement of `a` (primary) with `b` (check) on the pairs both scored."""
    out: dict[str, float | int | str] = {"kind": kind}
    if kind == "binary":
        ai, bi = a.astype(int), b.astype(int)
        both, ay, by = int((ai & bi).sum()), int(ai.sum()), int(bi.sum())
        p, r = (both / ay if ay else NAN), (both / by if by else NAN)
        out.update(primary_yes=ay, check_yes=by, both_yes=both, precision=p, recall=r,
                   f1=2 * p * r / (p + r) if p == p and r == r and p + r > 0 else NAN,
                   kappa=cohen_kappa(ai.tolist(), bi.tolist()))
    elif kind == "ordinal":
        rho, tau = _rank_corr(a, b)
        integer = bool(np.all(a == np.round(a)) and np.all(b == np.round(b)))
        out.update(spearman=rho, kendall=tau, weighted_kappa=weighted_kappa(a, b) if integer else NAN)
    return out


def agreement(primary: pd.DataFrame, check: pd.DataFrame) -> pd.DataFrame:
    """Each primary judge's agreement with the check judge, per (suite, metric, judge).

    `check`: the check judge's score rows (KEYS + value, scored, judge) on the sampled responses;
    `primary`: the study's score rows (any superset: only rows of the same key and judge, by
    judge_prefix, are matched). sampled = the check's rows; n = pairs both judges scored;
    unscored_primary / unscored_check = sampled pairs each judge left unscored (or, for the primary,
    has no row for); kind = "binary" | "ordinal" | "unscored" (neither judge scored a sampled response).
    Columns COLUMNS; NaN where a statistic is undefined or not of the metric's kind."""
    c = check.assign(judge=judge_prefix(check["judge"]))
    p = primary.assign(judge=judge_prefix(primary["judge"]))[[*KEYS, "judge", "value", "scored"]]
    m = c[[*KEYS, "judge", "value", "scored"]].merge(p, on=[*KEYS, "judge"], how="left", suffixes=("_c", "_p"))
    m["scored_p"] = m["scored_p"].astype("boolean").fillna(False).astype(bool)
    rows = []
    for (suite, metric, judge), g in m.groupby(["suite", "metric", "judge"], sort=True):
        ok = g[g["scored_c"].astype(bool) & g["scored_p"]]
        a, b = ok["value_p"].to_numpy(float), ok["value_c"].to_numpy(float)
        # the metric's kind from every verdict either judge gave, paired or not
        given = np.concatenate([g.loc[g["scored_p"], "value_p"].to_numpy(float),
                                g.loc[g["scored_c"].astype(bool), "value_c"].to_numpy(float)])
        kind = "unscored" if not len(given) else "binary" if np.isin(given, (0.0, 1.0)).all() else "ordinal"
        rows.append({"suite": suite, "metric": metric, "judge": judge, "sampled": len(g), "n": len(ok),
                     "unscored_primary": int((~g["scored_p"]).sum()),
                     "unscored_check": int((~g["scored_c"].astype(bool)).sum()), **_stats(a, b, kind)})
    return pd.DataFrame(rows, columns=list(COLUMNS))
