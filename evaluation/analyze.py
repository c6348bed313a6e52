"""Pure-table analysis of a value-induction study: per-run metrics, paired contrasts against the base
model and against random-subset controls, the induced × expressed co-expression matrix, its
permutation null, and an A/A check between control arms.

Inputs follow ``evaluation.types``: ``runs`` has RUN_COLUMNS, ``scores`` has SCORE_COLUMNS.
Nothing here trains, generates or judges; tables in, tables out.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from evaluation import stats

__all__ = [
    "per_run_metrics",
    "contrasts",
    "coexpression",
    "coexpression_matrix",
    "coexpression_permutation_null",
    "aa_check",
    "CONTRAST_COLUMNS",
]

VALUES_SUITE = "values"
EXPRESSES_PREFIX = "expresses/"
_KEYS = ["suite", "metric", "judge"]

CONTRAST_COLUMNS = [
    "model", "condition", "kind", "value", "suite", "metric", "judge", "reference",
    "n_seeds", "n_items", "n_unscored_pairs", "mean_condition", "mean_reference", "effect",
    "ci_lo", "ci_hi", "p_value", "p_wilcoxon", "p_seed", "p_holm", "p_bh", "effect_size",
    "effect_size_kind", "risk_difference", "significant",
]


# ----------------------------------------------------------------------------- per-run metrics

def _with_valid(scores: pd.DataFrame) -> pd.DataFrame:
    """Copy of scores with a float column ``v``: the value where scored, NaN otherwise."""
    s = scores.copy()
    ok = s["scored"].fillna(False).astype(bool) & s["value"].notna()
    s["v"] = s["value"].astype(float).where(ok)
    return s


def per_run_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean score per (run_id, suite, metric, judge) over scored items, with scored/unscored counts."""
    cols = ["run_id", "suite", "metric", "judge", "mean", "n_scored", "n_unscored"]
    if scores is None or len(scores) == 0:
        return pd.DataFrame(columns=cols)
    s = _with_valid(scores)
    g = s.groupby(["run_id", "suite", "metric", "judge"], sort=True)["v"]
    out = g.agg(mean="mean", n_scored="count", n_total="size").reset_index()
    out["n_unscored"] = out["n_total"] - out["n_scored"]
    return out[cols]


def _is_binary(x: np.ndarray) -> bool:
    x = x[np.isfinite(x)]
    return x.size > 0 and bool(np.all((x == 0) | (x == 1)))


# ----------------------------------------------------------------------------- contrast engine

def _nanmean_rows(m: np.ndarray) -> np.ndarray:
    """Column-wise nanmean over rows without the empty-slice warning (all-NaN -> NaN)."""
    ok = np.isfinite(m)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, m, 0.0).sum(axis=0) / n, np.nan)


def _seed_key(x) -> int | None:
    try:
        return int(x) if x is not None and np.isfinite(float(x)) else None
    except (TypeError, ValueError):
        return None


def _rng_for(seed: int, *key) -> np.random.Generator:
    # One stream per contrast, derived from its key, so a row's CI/p does not depend on which
    # other rows were computed before it.
    return np.random.default_rng([seed, zlib.crc32("|".join(map(str, key)).encode())])


@dataclass
class _Params:
    alpha: float
    n_boot: int
    n_perm: int
    seed: int


def _reference_groups(cond_runs: pd.DataFrame, ref_runs: pd.DataFrame,
                      match_seed: bool) -> list[tuple[str, ...]]:
    """Per condition run, the reference runs averaged into its reference arm.

    With ``match_seed`` these are the reference runs sharing the condition run's seed (all of
    them when none does); otherwise every reference run.
    """
    every = tuple(ref_runs["run_id"])
    if not match_seed:
        return [every] * len(cond_runs)
    out = []
    for seed in cond_runs["_seed"]:
        same = tuple(ref_runs.loc[ref_runs["_seed"] == seed, "run_id"]) if seed is not None else ()
        out.append(same or every)
    return out


def _pair_stats(cond: np.ndarray, ref: np.ndarray, exists: np.ndarray, binary: bool,
                p: _Params, rng: np.random.Generator) -> dict:
    """Statistics of one paired contrast from aligned (runs × items) condition/reference arrays."""
    valid = np.isfinite(cond) & np.isfinite(ref)
    diffs = np.where(valid, cond - ref, np.nan)
    out = dict(
        n_seeds=int(valid.any(axis=1).sum()),
        n_items=int(valid.any(axis=0).sum()),
        n_unscored_pairs=int((exists & ~valid).sum()),
    )
    nan_stats = dict(mean_condition=math.nan, mean_reference=math.nan, effect=math.nan,
                     ci_lo=math.nan, ci_hi=math.nan, p_value=math.nan, p_wilcoxon=math.nan,
                     p_seed=math.nan, effect_size=math.nan, risk_difference=math.nan)
    kind = "cohens_h" if binary else "cohens_d"
    if not valid.any():
        return {**out, **nan_stats, "effect_size_kind": kind}
    mc, mr = float(cond[valid].mean()), float(ref[valid].mean())
    # Seed-aggregated per-item differences: the unit of the sign-flip test and of d_z.
    per_item = _nanmean_rows(diffs)
    per_item = per_item[np.isfinite(per_item)]
    lo, hi = stats.hierarchical_bootstrap_ci(diffs, p.n_boot, p.alpha, rng)
    out.update(
        mean_condition=mc, mean_reference=mr,
        effect=float(diffs[valid].mean()),
        ci_lo=lo, ci_hi=hi,
        p_value=stats.paired_permutation_test(per_item, p.n_perm, rng),
        p_wilcoxon=stats.wilcoxon_p(per_item),
        p_seed=stats.seed_level_t_test(diffs),
        effect_size=stats.cohens_h(mc, mr) if binary else stats.cohens_d_paired(per_item),
        effect_size_kind=kind,
        risk_difference=stats.risk_difference(mc, mr) if binary else math.nan,
    )
    return out


def _wide(scores: pd.DataFrame, run_ids) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values, exists) frames indexed by (suite, metric, judge, item_id), one column per run."""
    s = _with_valid(scores[scores["run_id"].isin(set(run_ids))])
    g = s.groupby(_KEYS + ["item_id", "run_id"], sort=True)["v"].agg(["mean", "size"])
    vals = g["mean"].unstack("run_id")
    exists = g["size"].unstack("run_id").notna()
    missing = [r for r in run_ids if r not in vals.columns]
    for r in missing:  # runs with no score rows at all: every pair with them is unscored
        vals[r] = np.nan
        exists[r] = False
    return vals, exists


def _prepare_runs(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs.copy()
    r["_seed"] = [_seed_key(x) for x in r["seed"]]
    r["_seed_sort"] = [-1 if x is None else x for x in r["_seed"]]
    return r.sort_values(["model", "condition", "_seed_sort", "run_id"], kind="stable")


def _compare_arms(vals: pd.DataFrame, exists: pd.DataFrame, cond_runs: pd.DataFrame,
                  ref_runs: pd.DataFrame, match_seed: bool, p: _Params, key: tuple) -> list[dict]:
    """One row per (suite, metric, judge) comparing cond_runs to ref_runs item by item."""
    col = {r: i for i, r in enumerate(vals.columns)}
    ci = np.array([col[r] for r in cond_runs["run_id"]], dtype=int)
    ri = np.array([col[r] for r in ref_runs["run_id"]], dtype=int)
    groups = _reference_groups(cond_runs, ref_runs, match_seed)
    group_cols = {g: np.array([col[r] for r in g], dtype=int) for g in set(groups)}
    # Plain numpy inside the loop: per-metric pandas indexing dominated the runtime.
    values, present = vals.to_numpy(float), exists.to_numpy(bool)
    rows = []
    for (suite, metric, judge), pos in sorted(vals.groupby(level=[0, 1, 2]).indices.items()):
        ex = present[pos]
        # Items never seen by either arm are not part of this pair at all.
        seen = ex[:, ci].any(axis=1) | ex[:, ri].any(axis=1)
        if not seen.any():
            continue
        mat, ex = values[pos][seen], ex[seen]
        ref_arm = {g: _nanmean_rows(mat[:, c].T) for g, c in group_cols.items()}
        cond = mat[:, ci].T
        ref = np.vstack([ref_arm[g] for g in groups])
        ex_pair = ex[:, ci].T | ex[:, ri].any(axis=1)[None, :]
        binary = _is_binary(mat[:, np.concatenate([ci, ri])])
        res = _pair_stats(cond, ref, ex_pair, binary, p, _rng_for(p.seed, *key, suite, metric, judge))
        rows.append(dict(suite=suite, metric=metric, judge=judge, **res))
    return rows


def _add_corrections(df: pd.DataFrame, family: list[str], alpha: float) -> pd.DataFrame:
    df = df.copy()
    df["p_holm"] = np.nan
    df["p_bh"] = np.nan
    for _, idx in df.groupby(family, sort=False, dropna=False).groups.items():
        pv = df.loc[idx, "p_value"].to_numpy(float)
        df.loc[idx, "p_holm"] = stats.correct(pv, "holm")
        df.loc[idx, "p_bh"] = stats.correct(pv, "fdr_bh")
    df["significant"] = (df["p_holm"] < alpha).fillna(False).astype(bool)
    return df


def contrasts(runs: pd.DataFrame, scores: pd.DataFrame, alpha: float = 0.05, n_boot: int = 2000,
              n_perm: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired contrasts of every trained condition against the base model and against controls.

    One row per (model, condition, suite, metric, judge, reference). Reference "base" is the
    model's base run(s); reference "control" is, per condition run, the item-wise mean over the
    model's control runs with the same seed (all control runs when no seed matches). Control
    conditions get only the "base" reference. Pairs unscored in either arm are dropped and counted
    in ``n_unscored_pairs``.

    ``effect`` is the mean paired difference over all (seed, item) pairs, ``ci_lo/ci_hi`` a
    hierarchical (seed, then item) bootstrap CI of it, and ``p_value`` a sign-flip permutation test
    on per-item differences averaged over seeds. That test treats prompt items as the sampling
    unit, so a run-level shift shared by all items of one seed counts as signal; ``p_seed`` (t-test
    over per-seed mean differences, not used for ``significant``; against "base" it conditions on
    the single base run) and the CI reflect seed noise,
    and :func:`aa_check` on two control arms shows whether that matters for a study. ``p_holm``/``p_bh`` are corrected within each
    family (model, reference, judge): all conditions × suites × metrics scored by that judge.
    """
    p = _Params(alpha, n_boot, n_perm, seed)
    r = _prepare_runs(runs)
    rows = []
    for model, mr in r.groupby("model", sort=True):
        base = mr[mr["kind"] == "base"]
        controls = mr[mr["kind"] == "control"]
        vals, exists = _wide(scores, list(mr["run_id"]))
        if vals.empty:
            continue
        trained = mr[mr["kind"].isin(["value", "control"])]
        for condition, cr in trained.groupby("condition", sort=True):
            kind = cr["kind"].iloc[0]
            value = cr["value"].iloc[0] if "value" in cr else None
            refs = []
            if len(base):
                refs.append(("base", base, False))
            if kind == "value" and len(controls):
                refs.append(("control", controls, True))
            for ref_name, ref_runs, match in refs:
                for row in _compare_arms(vals, exists, cr, ref_runs, match, p,
                                         (model, condition, ref_name)):
                    rows.append(dict(model=model, condition=condition, kind=kind,
                                     value=None if pd.isna(value) else value,
                                     reference=ref_name, **row))
    if not rows:
        return pd.DataFrame(columns=CONTRAST_COLUMNS)
    df = _add_corrections(pd.DataFrame(rows), ["model", "reference", "judge"], alpha)
    return df[CONTRAST_COLUMNS].reset_index(drop=True)


# ----------------------------------------------------------------------------- co-expression

def _induced_value(condition: str, value) -> str:
    if isinstance(value, str) and value:
        return value
    return condition.removeprefix("value-")


def coexpression(contrasts_df: pd.DataFrame, alpha: float = 0.05, correction: str = "holm") -> pd.DataFrame:
    """Induced × expressed effects (long form) for ``expresses/<value>`` metrics of the values suite.

    Uses the contrast against control, or against base where a cell has no control contrast.
    ``label`` is "related" for a significantly positive off-diagonal cell, "contrastive" for a
    significantly negative one, "induced" on the diagonal, "" otherwise; significance is the
    chosen corrected p (``p_holm`` or ``p_bh`` from :func:`contrasts`) below ``alpha``.
    """
    cols = ["model", "judge", "induced", "expressed", "reference", "effect", "ci_lo", "ci_hi",
            "p_value", "p_holm", "p_bh", "effect_size", "n_seeds", "n_items", "diagonal",
            "significant", "label"]
    if contrasts_df is None or len(contrasts_df) == 0:
        return pd.DataFrame(columns=cols)
    c = contrasts_df[(contrasts_df["suite"] == VALUES_SUITE)
                     & contrasts_df["metric"].astype(str).str.startswith(EXPRESSES_PREFIX)
                     & (contrasts_df["kind"] == "value")].copy()
    if c.empty:
        return pd.DataFrame(columns=cols)
    c["induced"] = [_induced_value(k, v) for k, v in zip(c["condition"], c["value"])]
    c["expressed"] = c["metric"].str.removeprefix(EXPRESSES_PREFIX)
    # Prefer the control reference; keep base only for cells without one.
    c["_pref"] = (c["reference"] != "control").astype(int)
    c = (c.sort_values(["model", "judge", "induced", "expressed", "_pref"], kind="stable")
          .drop_duplicates(["model", "judge", "induced", "expressed"], keep="first"))
    pcol = {"holm": "p_holm", "fdr_bh": "p_bh"}[correction]
    c["diagonal"] = c["induced"] == c["expressed"]
    c["significant"] = (c[pcol] < alpha).fillna(False).astype(bool)
    c["label"] = np.select(
        [c["diagonal"], c["significant"] & (c["effect"] > 0), c["significant"] & (c["effect"] < 0)],
        ["induced", "related", "contrastive"], default="")
    return c[cols].reset_index(drop=True)


def coexpression_matrix(coexp: pd.DataFrame, model: str | None = None, judge: str | None = None,
                        column: str = "effect") -> pd.DataFrame:
    """Square induced × expressed pivot of one column of :func:`coexpression` for one model/judge."""
    c = coexp
    if model is not None:
        c = c[c["model"] == model]
    if judge is not None:
        c = c[c["judge"] == judge]
    m = c.pivot_table(index="induced", columns="expressed", values=column, aggfunc="first")
    order = sorted(set(m.index) | set(m.columns))
    return m.reindex(index=[v for v in order if v in m.index], columns=order)


def _only(values, what: str):
    u = sorted(set(values))
    if len(u) != 1:
        raise ValueError(f"several {what}s present ({u}); pass {what}= explicitly")
    return u[0]


def coexpression_permutation_null(runs: pd.DataFrame, scores: pd.DataFrame, n_perm: int = 1000,
                                  seed: int = 0, model: str | None = None,
                                  judge: str | None = None, center: bool = True) -> dict:
    """Permutation test of the co-expression matrix as a whole.

    Per value run, delta = expression rate − reference rate (mean of the model's control runs,
    or its base run(s) without controls). Cell (a, b) is the mean delta of runs inducing a on
    metric expresses/b. Statistic: sum of squared off-diagonal cells. Null: shuffle induced-value
    labels across the value runs. Each run's own-value metric is masked first, otherwise shuffling
    would move the (large, expected) diagonal effect into off-diagonal cells and inflate the null;
    the observed statistic is unchanged by the mask. With ``center`` (default) each metric's mean
    delta over value runs is subtracted first: a shift shared by all value runs is invariant under
    relabelling and would only dilute the test (``center=False`` gives the raw sum of squared
    deltas). A small p says the crosstalk pattern depends on which value was induced.
    Returns model, judge, reference, statistic, p_value, n_perm, n_runs, n_values, null_mean,
    null_q95, center and the observed off-diagonal ``matrix`` (DataFrame).
    """
    prm = per_run_metrics(scores)
    prm = prm[(prm["suite"] == VALUES_SUITE) & prm["metric"].astype(str).str.startswith(EXPRESSES_PREFIX)]
    r = runs[runs["run_id"].isin(set(prm["run_id"]))]
    model = model if model is not None else _only(r["model"], "model")
    judge = judge if judge is not None else _only(prm["judge"], "judge")
    r = r[r["model"] == model]
    prm = prm[prm["judge"] == judge]
    rates = prm.pivot_table(index="run_id", columns="metric", values="mean", aggfunc="mean")
    rates.columns = [c.removeprefix(EXPRESSES_PREFIX) for c in rates.columns]
    vr = r[r["kind"] == "value"]
    reference = "control" if (r["kind"] == "control").any() else "base"
    ref_ids = r.loc[r["kind"] == reference, "run_id"]
    if vr.empty or ref_ids.empty:
        raise ValueError("need value runs and control or base runs")
    ref = rates.reindex(ref_ids).mean(axis=0)
    delta = rates.reindex(vr["run_id"]) - ref
    labels = np.array([_induced_value(k, v) for k, v in zip(vr["condition"], vr["value"])])
    expressed = np.array(delta.columns)
    d = delta.to_numpy(float, copy=True)
    d[labels[:, None] == expressed[None, :]] = np.nan
    ok = np.isfinite(d)
    if center:
        # Remove each metric's shift shared by all value runs: it is invariant under relabelling,
        # so it only adds the same constant to the observed and null statistics and costs power.
        with np.errstate(invalid="ignore"):
            d = d - np.nanmean(d, axis=0, keepdims=True)
    d0, okf = np.where(ok, d, 0.0), ok.astype(float)
    levels = np.unique(labels)
    offdiag = levels[:, None] != expressed[None, :]

    def statistic(lab: np.ndarray) -> float:
        g = (lab[:, None] == levels[None, :]).astype(float)  # runs × levels
        with np.errstate(invalid="ignore", divide="ignore"):
            cell = (g.T @ d0) / (g.T @ okf)
        return float(np.nansum(np.where(offdiag, cell, np.nan) ** 2))

    obs = statistic(labels)
    rng = np.random.default_rng(seed)
    null = np.array([statistic(rng.permutation(labels)) for _ in range(n_perm)])
    count = np.count_nonzero(null >= obs - 1e-12 * abs(obs))
    with np.errstate(invalid="ignore", divide="ignore"):
        cells = (((labels[:, None] == levels[None, :]).astype(float).T @ d0)
                 / ((labels[:, None] == levels[None, :]).astype(float).T @ okf))
    return dict(
        model=model, judge=judge, reference=reference, statistic=obs,
        p_value=float((count + 1) / (n_perm + 1)), n_perm=n_perm, n_runs=len(labels),
        n_values=len(levels), null_mean=float(null.mean()),
        null_q95=float(np.quantile(null, 0.95)), center=center,
        matrix=pd.DataFrame(np.where(offdiag, cells, np.nan), index=levels, columns=expressed),
    )


# ----------------------------------------------------------------------------- A/A check

def aa_check(runs: pd.DataFrame, scores: pd.DataFrame, condition_a: str, condition_b: str,
             model: str | None = None, alpha: float = 0.05, method: str = "holm",
             n_boot: int = 500, n_perm: int = 2000, seed: int = 0) -> dict:
    """A/A check: compare two control conditions (paired by seed) on every (suite, metric, judge).

    Both arms are trained on random subsets, so every null hypothesis is true and, after
    correction, at most ``alpha`` of such checks should show any significant comparison
    (family-wise, for "holm"). Returns n_tests, n_significant, n_significant_uncorrected,
    any_significant and the per-comparison ``table``.
    """
    p = _Params(alpha, n_boot, n_perm, seed)
    r = _prepare_runs(runs)
    if model is None:
        model = _only(r.loc[r["condition"].isin([condition_a, condition_b]), "model"], "model")
    r = r[r["model"] == model]
    ra, rb = r[r["condition"] == condition_a], r[r["condition"] == condition_b]
    if ra.empty or rb.empty:
        raise ValueError(f"no runs for {condition_a!r} or {condition_b!r} of model {model!r}")
    vals, exists = _wide(scores, list(ra["run_id"]) + list(rb["run_id"]))
    rows = _compare_arms(vals, exists, ra, rb, True, p, (model, condition_a, condition_b))
    table = pd.DataFrame(rows)
    if table.empty:
        return dict(model=model, n_tests=0, n_significant=0, n_significant_uncorrected=0,
                    any_significant=False, table=table)
    table["p_adj"] = stats.correct(table["p_value"].to_numpy(float), method)
    table["significant"] = (table["p_adj"] < alpha).fillna(False).astype(bool)
    n_sig = int(table["significant"].sum())
    return dict(model=model, method=method, alpha=alpha,
                n_tests=int(table["p_value"].notna().sum()), n_significant=n_sig,
                n_significant_uncorrected=int((table["p_value"] < alpha).sum()),
                any_significant=n_sig > 0, table=table)


def power_table(contrasts_df: pd.DataFrame, target_halfwidth: float | None = None, min_effect: float | None = None,
                alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Per contrast: the CI half-width now, the seeds to reach a target half-width, and the seeds to
    detect `min_effect` (or the observed effect when None) with the given power."""
    from .stats import seeds_for_halfwidth, seeds_for_power

    if contrasts_df is None or contrasts_df.empty:
        return pd.DataFrame()
    rows = []
    for r in contrasts_df.itertuples():
        hw = (r.ci_hi - r.ci_lo) / 2
        s = int(r.n_seeds)
        effect = min_effect if min_effect is not None else r.effect
        rows.append({"model": r.model, "condition": r.condition, "reference": r.reference, "suite": r.suite,
                     "metric": r.metric, "judge": r.judge, "n_seeds": s, "ci_halfwidth": hw,
                     "seeds_for_target": seeds_for_halfwidth(hw, s, target_halfwidth) if target_halfwidth else None,
                     "detect_effect": effect, "seeds_for_power": seeds_for_power(hw, s, effect, alpha, power)})
    return pd.DataFrame(rows)
