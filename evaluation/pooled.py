"""Each contrast pooled across a study's models: a random-effects meta-analysis of the per-model
estimates (effect and SE from the contrasts table), Holm and BH across the pooled family.

Per (condition, suite, metric, primary judge, reference), the models' estimates y_j with variances
v_j = se_j² are combined with DerSimonian–Laird τ² (between-model variance) and a Hartung–Knapp–
Sidik–Jonkman (HKSJ) interval: t with k − 1 df on the scaled variance q/Σw*, q floored at 1 (the
"modified" HKSJ of Knapp & Hartung 2003, Röver, Knapp & Friede 2015). HKSJ keeps its coverage with
few studies where the normal-theory DL interval does not (IntHout, Ioannidis & Borm 2014).

Items are crossed with models too: every model answers the same prompts, so an item × condition
effect common to all models enters every model's estimate alike and does not average away by
adding models. The per-model SEs hold it (as var_item / n_items) but a meta-analysis takes the
estimates as independent. We add the part it misses if the item term were shared in full,
Σa_j c_j − Σa_j² c_j (a_j: the pooled weights, c_j = var_item_j / n_items_j): exact when the item
interaction is common to all models, conservative when it is not (docs/STATISTICS.md,
"Across models"; tests/test_calibration_pooled.py measures both).

Rows with one run (no p-value: run-to-run variance unmeasured) are left out of the pool. Tables
in, tables out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy import special

from evaluation import stats

__all__ = ["POOLED_COLUMNS", "Pooled", "random_effects", "pool_contrasts", "ALL_MODELS"]

ALL_MODELS = "all models"  # the `pool` of the every-model rows; a family's rows are named by the family

_KEYS = ["condition", "kind", "value", "suite", "metric", "reference", "family"]
POOLED_COLUMNS = ["pool", *_KEYS, "judge", "primary", "k_models", "models", "effect", "se", "df", "ci_lo",
                  "ci_hi", "p_value", "p_holm", "p_bh", "significant", "tau2", "i2", "hksj_scale",
                  "shared_item_var", "inference"]


@dataclass(frozen=True)
class Pooled:
    """One random-effects pool of k per-model estimates."""
    effect: float
    se: float
    df: float
    ci_lo: float
    ci_hi: float
    p_value: float
    tau2: float          # DerSimonian–Laird between-model variance
    i2: float            # share of the estimates' dispersion beyond their sampling error
    hksj_scale: float    # q: the estimates' weighted dispersion over its expectation (floored at 1 in the SE)
    shared_item_var: float  # added for an item × condition effect common to all models
    k: int


def random_effects(effect: Any, se: Any, shared_item: Any = None, alpha: float = 0.05,
                   floor_scale: bool = True) -> Pooled:
    """Pool k ≥ 2 estimates (``effect``, ``se``); ``shared_item``: each estimate's item-term
    variance (var_item / n_items), counted as if common to all; ``floor_scale=False`` gives the
    plain HKSJ variance (statsmodels' "random effect wls"), for comparison."""
    y, v = np.asarray(effect, float), np.asarray(se, float) ** 2
    k = len(y)
    if k < 2 or not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError(f"random_effects needs k ≥ 2 finite estimates with se > 0 (got k = {k})")
    w = 1 / v
    fe = float((w * y).sum() / w.sum())
    q_stat = float((w * (y - fe) ** 2).sum())
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (q_stat - (k - 1)) / c) if c > 0 else 0.0
    i2 = max(0.0, (q_stat - (k - 1)) / q_stat) if q_stat > 0 else 0.0
    wr = 1 / (v + tau2)
    a = wr / wr.sum()
    mu = float((a * y).sum())
    scale = float((wr * (y - mu) ** 2).sum() / (k - 1))
    cj = np.zeros(k) if shared_item is None else np.nan_to_num(np.asarray(shared_item, float), nan=0.0)
    shared = max(0.0, float((a * cj).sum() - (a**2 * cj).sum()))
    var = (max(scale, 1.0) if floor_scale else scale) / float(wr.sum()) + shared
    se_mu, df = math.sqrt(var), float(k - 1)
    if se_mu == 0:
        return Pooled(mu, 0.0, df, mu, mu, 1.0 if mu == 0 else 0.0, tau2, i2, scale, shared, k)
    qt = float(special.stdtrit(df, 1 - alpha / 2))
    p = float(2 * special.stdtr(df, -abs(mu) / se_mu))
    return Pooled(mu, se_mu, df, mu - qt * se_mu, mu + qt * se_mu, p, tau2, i2, scale, shared, k)


def _poolable(c: pd.DataFrame) -> pd.DataFrame:
    """Primary rows with a runs × items test (finite p, se > 0): one run's items-only CI is not
    an estimate of the model's effect across training runs."""
    c = c[c["primary"].astype(bool)]
    ok = (np.isfinite(c["effect"].to_numpy(float)) & (c["se"].to_numpy(float) > 0)
          & np.isfinite(c["p_value"].to_numpy(float)))
    return c[ok]


def _pool_rows(c: pd.DataFrame, pool: str, alpha: float) -> list[dict[str, Any]]:
    rows = []
    for key, g in c.groupby(_KEYS, sort=True, dropna=False):
        if g["model"].nunique() < 2:
            continue
        g = g.drop_duplicates("model")
        item = (g["var_item"].to_numpy(float) / g["n_items"].to_numpy(float)) if "var_item" in g else None
        r = random_effects(g["effect"], g["se"], item, alpha)
        d = asdict(r)
        rows.append({"pool": pool, **dict(zip(_KEYS, key)), "judge": ", ".join(sorted(set(g["judge"].astype(str)))),
                     "primary": True, "k_models": d.pop("k"), "models": ", ".join(g["model"].astype(str)),
                     **d, "inference": f"random effects over {r.k} models (HKSJ, {r.k - 1} df)"})
    return rows


def pool_contrasts(contrasts_df: pd.DataFrame | None, alpha: float = 0.05,
                   families: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """Every contrast estimated in ≥ 2 models, pooled over all models (pool "all models") and, with
    ``families`` (model → models[i].family), over the models of each family having ≥ 2 of them
    (pool = the family's name). Holm and BH per (pool, reference, family of tests), as per model."""
    if contrasts_df is None or contrasts_df.empty:
        return pd.DataFrame(columns=POOLED_COLUMNS)
    c = _poolable(contrasts_df)
    rows = _pool_rows(c, ALL_MODELS, alpha)
    fam = {m: f for m, f in (families or {}).items() if f is not None and not pd.isna(f)}
    for name in sorted(set(fam.values())):
        members = [m for m, f in fam.items() if f == name]
        if len(members) >= 2:
            rows += _pool_rows(c[c["model"].isin(members)], str(name), alpha)
    if not rows:
        return pd.DataFrame(columns=POOLED_COLUMNS)
    df = pd.DataFrame(rows)
    holm, bh = np.full(len(df), np.nan), np.full(len(df), np.nan)
    for _, idx in df.groupby(["pool", "reference", "family"], sort=False).indices.items():
        p = df["p_value"].to_numpy(float)[idx]
        holm[idx], bh[idx] = stats.correct(p, "holm"), stats.correct(p, "fdr_bh")
    df = df.assign(p_holm=holm, p_bh=bh, significant=holm < alpha)
    return df[POOLED_COLUMNS].reset_index(drop=True)
