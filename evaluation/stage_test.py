"""Value × stage: does an induced value's own-expression effect (values/expresses/<v>) differ
between instruct models and the others (models[i].stage base or sft)?

Per value and reference, the instruct models' estimates are pooled (evaluation.pooled's random
effects; one model: its own estimate) and so are the other models'; the test is of their
difference, SE² = SE²_instruct + SE²_other, t with the Welch–Satterthwaite df of the two parts.
Holm across values per reference. The two groups are different models, so their estimates are
independent but for items shared by all models, which the pooled SEs already count in full.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy import special

from evaluation import stats
from evaluation.pooled import random_effects

__all__ = ["STAGE_TEST_COLUMNS", "INSTRUCT", "stage_test", "stage_line"]

INSTRUCT = "instruct"
STAGE_TEST_COLUMNS = ["value", "metric", "reference", "k_instruct", "k_other", "effect_instruct", "effect_other",
                      "difference", "se", "df", "ci_lo", "ci_hi", "p_value", "p_holm", "significant"]


def _group(g: pd.DataFrame, alpha: float) -> tuple[float, float, float]:
    """(effect, se, df) of one stage group's models."""
    if len(g) == 1:
        r = g.iloc[0]
        return float(r["effect"]), float(r["se"]), float(r["df"])
    item = g["var_item"].to_numpy(float) / g["n_items"].to_numpy(float) if "var_item" in g else None
    p = random_effects(g["effect"], g["se"], item, alpha)
    return p.effect, p.se, p.df


def _difference(a: tuple[float, float, float], b: tuple[float, float, float], alpha: float) -> dict[str, float]:
    (ea, sa, da), (eb, sb, db) = a, b
    var = sa**2 + sb**2
    df = var**2 / (sa**4 / da + sb**4 / db)
    se, diff = math.sqrt(var), ea - eb
    q = float(special.stdtrit(df, 1 - alpha / 2))
    return dict(effect_instruct=ea, effect_other=eb, difference=diff, se=se, df=df, ci_lo=diff - q * se,
                ci_hi=diff + q * se, p_value=float(2 * special.stdtr(df, -abs(diff) / se)))


def stage_test(contrasts_df: pd.DataFrame | None, stages: Mapping[str, str], alpha: float = 0.05) -> pd.DataFrame:
    """One row per (induced value, reference) with own-expression contrasts (primary judge, runs ×
    items test) in at least one instruct and one other model. Empty when the study's models are
    of one stage."""
    if contrasts_df is None or contrasts_df.empty or len(set(stages.values())) < 2:
        return pd.DataFrame(columns=STAGE_TEST_COLUMNS)
    c = contrasts_df[contrasts_df["primary"].astype(bool) & (contrasts_df["kind"] == "value")
                     & (contrasts_df["suite"] == "values")]
    c = c[(c["metric"] == "expresses/" + c["value"].astype(str)) & np.isfinite(c["p_value"].to_numpy(float))
          & (c["se"].to_numpy(float) > 0)]
    c = c.assign(_instruct=c["model"].map(stages) == INSTRUCT)
    rows: list[dict[str, Any]] = []
    for (value, metric, ref), g in c.groupby(["value", "metric", "reference"], sort=True):
        ins, oth = g[g["_instruct"]], g[~g["_instruct"]]
        if ins.empty or oth.empty:
            continue
        rows.append(dict(value=value, metric=metric, reference=ref, k_instruct=ins["model"].nunique(),
                         k_other=oth["model"].nunique(),
                         **_difference(_group(ins, alpha), _group(oth, alpha), alpha)))
    if not rows:
        return pd.DataFrame(columns=STAGE_TEST_COLUMNS)
    df = pd.DataFrame(rows)
    holm = np.full(len(df), np.nan)
    for _, idx in df.groupby("reference", sort=False).indices.items():
        holm[idx] = stats.correct(df["p_value"].to_numpy(float)[idx], "holm")
    return df.assign(p_holm=holm, significant=holm < alpha)[STAGE_TEST_COLUMNS]


def stage_line(t: pd.DataFrame | None, reference: str) -> str:
    """One-line verdict of the value × stage test against ``reference``."""
    if t is None or t.empty or (t["reference"] == reference).sum() == 0:
        return "not measured: the study's models are of one stage, or no value was tested in both groups"
    d = t[t["reference"] == reference]
    sig = d["significant"].astype(bool)
    larger, smaller = int((sig & (d["ci_lo"] > 0)).sum()), int((sig & (d["ci_hi"] < 0)).sum())
    return (f"own expression larger in instruct models for {larger} of {len(d)} values, smaller for {smaller} "
            f"(Holm, against the {reference}); mean difference {d['difference'].mean():+.3g}")
