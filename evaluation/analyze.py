"""Pure-table analysis of a value-induction study: per-run metrics, paired contrasts against the base
model and against random-subset controls (trained runs and items crossed, docs/STATISTICS.md),
the induced × expressed co-expression matrix with a whole-matrix test, the positive control, and
an A/A check between control arms.

Inputs follow ``evaluation.types``: ``runs`` has RUN_COLUMNS, ``scores`` has SCORE_COLUMNS.
Nothing here trains, generates or judges; tables in, tables out.
"""
from __future__ import annotations

import math
from fnmatch import fnmatch

import numpy as np
import pandas as pd

from evaluation import stats

__all__ = [
    "per_run_metrics",
    "contrasts",
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
]

VALUES_SUITE = "values"
EXPRESSES_PREFIX = "expresses/"
_KEYS = ["suite", "metric", "judge"]

PLANTED_SUITE = "planted"

CONTRAST_COLUMNS = [
    "model", "condition", "kind", "value", "suite", "metric", "judge", "reference", "primary", "family",
    "n_seeds", "n_items", "n_unscored_pairs", "mean_condition", "mean_reference", "effect", "se", "df",
    "ci_lo", "ci_hi", "p_value", "p_holm", "p_bh", "significant", "effect_size", "effect_size_kind",
    "risk_difference", "var_seed", "var_item", "var_resid", "inference",
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


def _lattice(x: np.ndarray, max_levels: int = 20) -> float:
    """The spacing of discrete scores (1 for 0/1, 1 for a 1–5 rubric), 0 for continuous ones."""
    u = np.unique(x[np.isfinite(x)])
    return float(np.diff(u).min()) if 1 < u.size <= max_levels else 0.0


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


def _effect_size(test: stats.CrossedTest, mc: float, mr: float, binary: bool) -> float:
    """Cohen's h for proportions; otherwise d = effect / SD of one (run, item) difference, which
    does not drift with the number of runs (unlike d_z of seed-averaged differences)."""
    if binary:
        return stats.cohens_h(mc, mr)
    var = np.nansum([test.var_seed, test.var_item, test.var_resid])
    return float(test.effect / math.sqrt(var)) if var > 0 else math.nan


def _pair_stats(cond: np.ndarray, ref: np.ndarray, exists: np.ndarray, binary: bool, alpha: float,
                resolution: float = 0.0) -> dict:
    """Statistics of one paired contrast from aligned (runs × items) condition/reference arrays;
    ``resolution``: the lattice spacing of one paired difference (see stats.crossed_test)."""
    valid = np.isfinite(cond) & np.isfinite(ref)
    # The crossed test needs a balanced table; the arms' means are taken over the same cells.
    rows, cols = stats.complete_index(valid)
    c, r = cond[rows][:, cols], ref[rows][:, cols]
    test = stats.crossed_test(c - r, alpha, resolution)
    mc, mr = (float(c.mean()), float(r.mean())) if c.size else (math.nan, math.nan)
    return dict(**test.as_dict(), n_unscored_pairs=int((exists & ~valid).sum()),
                mean_condition=mc, mean_reference=mr,
                effect_size=_effect_size(test, mc, mr, binary) if c.size else math.nan,
                effect_size_kind="cohens_h" if binary else "d_per_observation",
                risk_difference=stats.risk_difference(mc, mr) if binary and c.size else math.nan)


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
                  ref_runs: pd.DataFrame, match_seed: bool, alpha: float) -> list[dict]:
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
        scores = mat[:, np.concatenate([ci, ri])]
        # a reference arm averages up to K runs: its mean lives on a K-times finer lattice
        resolution = _lattice(scores) / max(len(g) for g in groups)
        rows.append(dict(suite=suite, metric=metric, judge=judge,
                         **_pair_stats(cond, ref, ex_pair, _is_binary(scores), alpha, resolution)))
    return rows


def _judge_matches(judge: str, name: str) -> bool:
    return judge == name or str(judge).split(":")[0] == name


def mark_primary(df: pd.DataFrame, primary_judges: dict[str, str] | None = None) -> pd.Series:
    """True on the rows scored by each (suite, metric)'s primary judge.

    ``primary_judges`` maps "suite/metric" patterns (fnmatch) or suite names to a judge name
    (matched whole or before its ":"); the first matching key wins. A metric with one judge needs
    no entry; one with several and no entry gets the alphabetically first.
    """
    primary_judges = primary_judges or {}
    chosen: dict[tuple[str, str], str] = {}
    for (suite, metric), judges in df.groupby(["suite", "metric"])["judge"]:
        judges = sorted(set(judges))
        name = next((j for k, j in primary_judges.items() if k == suite or fnmatch(f"{suite}/{metric}", k)), None)
        if name is not None:
            match = [j for j in judges if _judge_matches(j, name)]
            if not match:
                raise ValueError(f"analyze.primary_judges names {name!r} for {suite}/{metric}, "
                                 f"which is scored by {', '.join(judges)}")
            chosen[(suite, metric)] = match[0]
        else:
            chosen[(suite, metric)] = judges[0]
    return pd.Series([chosen[(s, m)] == j for s, m, j in zip(df["suite"], df["metric"], df["judge"])],
                     index=df.index, dtype=bool)


def family_of(kind: str, suite: str) -> str:
    """The Holm/BH family of a row. The positive control's planted-marker test is one pre-specified
    hypothesis; the marker in the other arms checks the detector's specificity; the positive arm's
    other metrics are its side effects; everything else is the study proper."""
    if suite == PLANTED_SUITE:
        return "positive control" if kind == "positive" else "planted marker"
    return "positive arm" if kind == "positive" else "study"


def _add_corrections(df: pd.DataFrame, family: list[str], alpha: float) -> pd.DataFrame:
    """Holm and BH within each family of primary rows. A sensitivity row (another judge of the
    same contrast) is Bonferroni-adjusted by its primary family's size and is never
    ``significant``: the verdict is the primary row's."""
    fam = df.groupby(family, sort=False, dropna=False).ngroup().to_numpy()
    prim = df["primary"].to_numpy(bool)
    p = df["p_value"].to_numpy(float)
    holm, bh = np.full(len(df), np.nan), np.full(len(df), np.nan)
    for g in np.unique(fam):
        primary, other = prim & (fam == g), ~prim & (fam == g)
        holm[primary], bh[primary] = stats.correct(p[primary], "holm"), stats.correct(p[primary], "fdr_bh")
        holm[other] = np.minimum(1.0, p[other] * max(int(np.isfinite(p[primary]).sum()), 1))
    with np.errstate(invalid="ignore"):
        return df.assign(p_holm=holm, p_bh=bh, significant=prim & (holm < alpha))


def _reference_controls(controls: pd.DataFrame, kind: str, value) -> pd.DataFrame:
    """The control runs a condition is compared with: per-value controls (a ``match`` column naming
    values, controls.match: per_value) only for their own value; otherwise every control."""
    if kind == "value" and "match" in controls.columns and controls["match"].notna().any():
        return controls[controls["match"] == value]
    return controls


def contrasts(runs: pd.DataFrame, scores: pd.DataFrame, alpha: float = 0.05,
              primary_judges: dict[str, str] | None = None) -> pd.DataFrame:
    """Paired contrasts of every trained condition against the base model and against controls.

    One row per (model, condition, suite, metric, judge, reference). Reference "base" is the
    model's base run(s); reference "control" is, per condition run, the item-wise mean over the
    model's control runs with the same seed (all control runs when no seed matches). Where the
    runs table's optional ``match`` column names a value for control runs (per-value controls),
    a value condition's control runs are only those matched to its value (none: no control
    reference); the positive arm's are all of them. Control conditions get only the "base"
    reference. Items unscored in any run of either arm are left out of the pair and counted in
    ``n_unscored_pairs``.

    Inference is :func:`evaluation.stats.crossed_test` on the (condition runs × items) table of
    paired differences: trained runs are the replication unit, so run-to-run variance and the
    item × condition interaction are both in the standard error; CI and p come from the same t,
    so the CI excludes 0 exactly when p < alpha. With a single run ``p_value`` is NaN.
    ``primary`` marks each metric's primary judge (:func:`mark_primary`); ``p_holm``/``p_bh``
    are corrected within (model, reference, family) over primary rows (see :func:`family_of`).
    """
    r = _prepare_runs(runs)
    rows = []
    for model, mr in r.groupby("model", sort=True):
        base = mr[mr["kind"] == "base"]
        controls = mr[mr["kind"] == "control"]
        vals, exists = _wide(scores, list(mr["run_id"]))
        if vals.empty:
            continue
        trained = mr[mr["kind"].isin(["value", "control", "positive"])]
        for condition, cr in trained.groupby("condition", sort=True):
            kind = cr["kind"].iloc[0]
            value = cr["value"].iloc[0] if "value" in cr else None
            for ref_name, ref_runs in _references(base, controls, kind, value):
                match = ref_name == "control"
                for row in _compare_arms(vals, exists, cr, ref_runs, match, alpha):
                    rows.append(dict(model=model, condition=condition, kind=kind,
                                     value=None if pd.isna(value) else value,
                                     reference=ref_name, **row))
    return _corrected(rows, CONTRAST_COLUMNS, primary_judges, alpha)


def _references(base: pd.DataFrame, controls: pd.DataFrame, kind: str, value) -> list[tuple[str, pd.DataFrame]]:
    """(reference name, its runs) a condition is compared with: the base model, and the controls
    (a control arm only against the base)."""
    refs = [("base", base)] if len(base) else []
    ref_controls = _reference_controls(controls, kind, value)
    if kind != "control" and len(ref_controls):
        refs.append(("control", ref_controls))
    return refs


def _corrected(rows: list[dict], columns: list[str], primary_judges: dict[str, str] | None,
               alpha: float) -> pd.DataFrame:
    """Rows as a table with the primary judge marked and Holm/BH per (model, reference, family)."""
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    df["primary"] = mark_primary(df, primary_judges)
    df["family"] = [family_of(k, s) for k, s in zip(df["kind"], df["suite"])]
    df = _add_corrections(df, ["model", "reference", "family"], alpha)
    return df[columns].reset_index(drop=True)


def verdicts(contrasts_df: pd.DataFrame) -> pd.DataFrame:
    """The headline rows: per (model, condition, suite, metric[, progress]), the primary judge's
    contrast against the controls, or against the base model where there is no control reference;
    in the values suite only the condition's own value. What MLflow shows as verdict metrics and
    the along-training figure draws."""
    c = contrasts_df[contrasts_df["primary"].astype(bool)]
    c = c[(c["suite"] != VALUES_SUITE) | (c["metric"] == EXPRESSES_PREFIX + c["value"].fillna(""))]
    keys = ["model", "condition", "suite", "metric"] + (["progress"] if "progress" in c.columns else [])
    c = c.assign(_pref=(c["reference"] != "control").astype(int)).sort_values([*keys, "_pref"], kind="stable")
    return c.drop_duplicates(keys).drop(columns="_pref").reset_index(drop=True)


def positive_control(contrasts_df: pd.DataFrame, alpha: float = 0.05) -> list[dict]:
    """The study's measured sensitivity: per model, the planted arm against the controls (or the
    base model without controls) on the planted marker, with a verdict line."""
    out = []
    if contrasts_df is None or contrasts_df.empty:
        return out
    c = contrasts_df[(contrasts_df["family"] == "positive control") & contrasts_df["primary"]]
    for model, m in c.groupby("model", sort=True):
        ref = "control" if (m["reference"] == "control").any() else "base"
        row = m[m["reference"] == ref].iloc[0]
        detected = bool(row["significant"] and row["ci_lo"] > 0)
        p = f"Holm p {row['p_holm']:.3g}" if np.isfinite(row["p_holm"]) else "no p-value from one run"
        what = (f"{model}: positive control {'detected' if detected else 'NOT detected'}: planted marker "
                f"{row['effect']:+.3f} against the {ref} (95% CI {row['ci_lo']:+.3f} to {row['ci_hi']:+.3f}, "
                f"{p}, {int(row['n_seeds'])} run(s) × {int(row['n_items'])} items)")
        if not detected:
            what += (f". This study cannot see effects of this size: a planted change of {row['effect']:+.3f} "
                     f"was not significant at α = {alpha}")
        out.append(dict(model=model, reference=ref, detected=detected, line=what,
                        **{k: row[k] for k in ("effect", "ci_lo", "ci_hi", "p_value", "p_holm", "n_seeds",
                                               "n_items", "inference")}))
    return out


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
                     & (contrasts_df["kind"] == "value") & contrasts_df["primary"]].copy()
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


def crosstalk_tests(coexp: pd.DataFrame, alpha: float = 0.05) -> list[dict]:
    """Whole-matrix test per (model, judge): does inducing a value move ANY other value?

    Simes' combination of the off-diagonal cells' crossed-test p-values: the global null is
    "every off-diagonal cell is 0". It inherits the cells' run-level inference (the earlier
    label-permutation null ignored run-to-run variance and was over-conservative), and it is
    valid under the positive dependence that a shared control arm induces.
    """
    out = []
    if coexp is None or coexp.empty:
        return out
    off = coexp[~coexp["diagonal"].astype(bool)]
    for (model, judge), c in off.groupby(["model", "judge"], sort=True):
        p = stats.simes(c["p_value"].to_numpy(float))
        out.append(dict(model=model, judge=judge, reference=", ".join(sorted(set(c["reference"]))),
                        n_cells=int(c["p_value"].notna().sum()), p_value=p,
                        significant=bool(np.isfinite(p) and p < alpha),
                        n_related=int((c["label"] == "related").sum()),
                        n_contrastive=int((c["label"] == "contrastive").sum())))
    return out


def _only(values, what: str):
    u = sorted(set(values))
    if len(u) != 1:
        raise ValueError(f"several {what}s present ({u}); pass {what}= explicitly")
    return u[0]


# ----------------------------------------------------------------------------- A/A check

def aa_check(runs: pd.DataFrame, scores: pd.DataFrame, condition_a: str, condition_b: str,
             model: str | None = None, alpha: float = 0.05, primary_judges: dict[str, str] | None = None) -> dict:
    """A/A check: compare two control conditions (paired by seed) on every (suite, metric, judge).

    Both arms are trained on random subsets, so every null hypothesis is true. The comparisons
    are tested and corrected exactly as :func:`contrasts` does (crossed test; Holm within each
    family of primary-judge rows), so the share of A/A checks with any significant comparison
    estimates the family-wise false-positive rate that the study's contrasts face. Returns
    n_tests, n_significant, n_significant_uncorrected, any_significant and the ``table``.
    """
    r = _prepare_runs(runs)
    if model is None:
        model = _only(r.loc[r["condition"].isin([condition_a, condition_b]), "model"], "model")
    r = r[r["model"] == model]
    ra, rb = r[r["condition"] == condition_a], r[r["condition"] == condition_b]
    if ra.empty or rb.empty:
        raise ValueError(f"no runs for {condition_a!r} or {condition_b!r} of model {model!r}")
    vals, exists = _wide(scores, list(ra["run_id"]) + list(rb["run_id"]))
    table = pd.DataFrame(_compare_arms(vals, exists, ra, rb, True, alpha))
    if table.empty:
        return dict(model=model, n_tests=0, n_significant=0, n_significant_uncorrected=0,
                    any_significant=False, table=table)
    table["primary"] = mark_primary(table, primary_judges)
    table["family"] = [family_of("control", s) for s in table["suite"]]
    table = _add_corrections(table, ["family"], alpha).rename(columns={"p_holm": "p_adj"})
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


# ----------------------------------------------------------------------------- along training

TREND_COLUMNS = ["model", "condition", "kind", "value", "suite", "metric", "judge", "reference", "primary",
                 "family", "points", "n_seeds", "n_items", "slope", "se", "df", "ci_lo", "ci_hi", "p_value",
                 "p_holm", "significant", "inference"]


def points_along_training(runs: pd.DataFrame, scores: pd.DataFrame, alpha: float = 0.05,
                          primary_judges: dict[str, str] | None = None) -> pd.DataFrame:
    """The contrasts at each train.eval_at point (a ``progress`` column), each training run counted
    once per point: :func:`contrasts` on the base runs and the trained runs at that point.

    ``runs`` has a ``progress`` column: a trained run's adapter at that share of its schedule
    (1 = the end; the base model 0). Empty with fewer than two points."""
    base, trained = runs[runs["kind"] == "base"], runs[runs["kind"] != "base"]
    points = sorted(trained["progress"].unique()) if "progress" in runs.columns else []
    if len(points) < 2:
        return pd.DataFrame(columns=[*CONTRAST_COLUMNS, "progress"])
    return pd.concat([contrasts(pd.concat([base, trained[trained["progress"] == p]]), scores, alpha,
                                primary_judges).assign(progress=p) for p in points], ignore_index=True)


def trend_along_training(runs: pd.DataFrame, scores: pd.DataFrame, alpha: float = 0.05,
                         primary_judges: dict[str, str] | None = None) -> pd.DataFrame:
    """The slope of each effect over training progress (dose-response), per (model, condition,
    suite, metric, judge, reference): one slope per (training run, item), from that run's own
    points, then the crossed runs × items test of the slopes (:func:`stats.crossed_test`). A run's
    points are repeated measures of one run, never separate runs: the inference replicates over
    training runs, as at the end of training. Empty with fewer than two points."""
    points = runs.loc[runs["kind"] != "base", "progress"].unique() if "progress" in runs.columns else []
    if len(points) < 2:
        return pd.DataFrame(columns=TREND_COLUMNS)
    rows = []
    r = _prepare_runs(runs)
    for model, mr in r.groupby("model", sort=True):
        vals, _ = _wide(scores, list(mr["run_id"]))
        if vals.empty:
            continue
        col = {run: i for i, run in enumerate(vals.columns)}
        values = vals.to_numpy(float)
        base_m, controls = mr[mr["kind"] == "base"], mr[mr["kind"] == "control"]
        for condition, cr in mr[mr["kind"] != "base"].groupby("condition", sort=True):
            kind, value = cr["kind"].iloc[0], cr["value"].iloc[0] if "value" in cr else None
            for ref_name, ref_runs in _references(base_m, controls, kind, value):
                for (suite, metric, judge), pos in sorted(vals.groupby(level=[0, 1, 2]).indices.items()):
                    slopes = [_item_slopes(values[pos], col, sr, ref_runs, ref_name == "control")
                              for _, sr in cr.groupby("_seed_sort", sort=True)]
                    test = stats.crossed_test(np.vstack(slopes), alpha)
                    rows.append(dict(model=model, condition=condition, kind=kind,
                                     value=None if pd.isna(value) else value, suite=suite, metric=metric,
                                     judge=judge, reference=ref_name, points=len(points),
                                     **{("slope" if k == "effect" else k): v for k, v in test.as_dict().items()
                                        if k not in ("var_seed", "var_item", "var_resid")}))
    return _corrected(rows, TREND_COLUMNS, primary_judges, alpha)


def _item_slopes(values: np.ndarray, col: dict, run_points: pd.DataFrame, ref_runs: pd.DataFrame,
                 same_point: bool) -> np.ndarray:
    """Per item, the OLS slope over progress of one training run's paired difference with its
    reference (controls: those at the same point and seed, else all at that point; base: the base)."""
    xs, diffs = [], []
    pts = run_points.sort_values("progress")
    for run_id, progress, seed in zip(pts["run_id"], pts["progress"], pts["_seed"]):
        ref = ref_runs
        if same_point:
            at = ref_runs[ref_runs["progress"] == progress]
            ref = at[at["_seed"] == seed] if (at["_seed"] == seed).any() else at
        arm = _nanmean_rows(values[:, [col[x] for x in ref["run_id"]]].T)
        xs.append(progress)
        diffs.append(values[:, col[run_id]] - arm)
    x = np.asarray(xs, float)
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    return w @ np.vstack(diffs)  # NaN for an item unscored at any point
