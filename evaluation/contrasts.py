"""The contrast engine: per-run metrics and paired contrasts of every trained condition against the
base model and the random-subset controls (trained runs and items crossed, docs/STATISTICS.md),
with each metric's primary judge, the Holm/BH families, the headline verdicts and the positive control.

Inputs follow ``evaluation.types``: ``runs`` has RUN_COLUMNS, ``scores`` has SCORE_COLUMNS.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from typing import Any

import numpy as np
import pandas as pd

from evaluation import stats
from evaluation.stats import nanmean_rows

Row = dict[str, Any]  # one row of a result table, before it becomes a DataFrame

VALUES_SUITE = "values"
EXPRESSES_PREFIX = "expresses/"
_KEYS = ["suite", "metric", "judge"]

PLANTED_SUITE = "planted"

CONTRAST_COLUMNS = [
    "model", "condition", "kind", "value", "suite", "metric", "judge", "reference", "primary", "family",
    "n_seeds", "n_items", "n_unscored_pairs", "mean_condition", "mean_reference", "effect", "se", "df",
    "ci_lo", "ci_hi", "p_value", "p_holm", "p_bh", "significant", "effect_size", "effect_size_kind",
    "risk_difference", "var_seed", "var_item", "var_resid", "inference",
    "rate_ci_lo", "rate_ci_hi", "ref_rate_ci_lo", "ref_rate_ci_hi",
]
# Binary metrics: each arm's rate with a CI inside [0, 1] (stats.rate_interval); NaN otherwise.
RATE_CI_COLUMNS = ["rate_ci_lo", "rate_ci_hi", "ref_rate_ci_lo", "ref_rate_ci_hi"]


# ----------------------------------------------------------------------------- per-run metrics

def with_valid(scores: pd.DataFrame) -> pd.DataFrame:
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
    s = with_valid(scores)
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

def _seed_key(x: Any) -> int | None:
    try:
        return int(x) if x is not None and np.isfinite(float(x)) else None
    except (TypeError, ValueError):
        return None


def _reference_groups(cond_runs: pd.DataFrame, ref_runs: pd.DataFrame,
                      match_seed: bool) -> tuple[list[tuple[str, ...]], np.ndarray, str]:
    """How a condition's runs meet the reference runs: (per kept condition run, the reference runs
    averaged into its reference; which condition runs are kept; how they are paired).

    Without ``match_seed`` every row gets every reference run ("shared": one reference arm, its
    noise repeats in every row). With it, each condition run gets the reference runs of its own
    seed ("matched"). A condition run with no such seed cannot be paired: giving it the mean of
    all references made the rows correlated and under-estimated the seed variance (E[SE²]/Var
    .50–.71). So when some seeds do not match, only the matched runs are kept if at least 2 are
    ("matched k of n"), and otherwise the arms are compared as two independent crossed samples
    ("independent": no groups).
    """
    every = tuple(ref_runs["run_id"])
    n = len(cond_runs)
    if not match_seed:
        return [every] * n, np.ones(n, bool), "shared"
    same = [tuple(ref_runs.loc[ref_runs["_seed"] == seed, "run_id"]) if seed is not None else ()
            for seed in cond_runs["_seed"]]
    keep = np.array([bool(g) for g in same], bool)
    if keep.all():
        return same, keep, "matched"
    if keep.sum() >= 2:
        return [g for g in same if g], keep, f"matched {int(keep.sum())} of {n}"
    return [], np.ones(n, bool), "independent"


def _effect_size(test: stats.CrossedTest, mc: float, mr: float, binary: bool) -> float:
    """Cohen's h for proportions; otherwise d = effect / SD of one (run, item) difference, which
    does not drift with the number of runs (unlike d_z of seed-averaged differences)."""
    if binary:
        return stats.cohens_h(mc, mr)
    var = np.nansum([test.var_seed, test.var_item, test.var_resid])
    return float(test.effect / math.sqrt(var)) if var > 0 else math.nan


def _floor_at_hypothesis(diffs: np.ndarray, resolution: float, cond_events: float, k: int, mr: float,
                         s: int) -> Callable[[float], tuple[float, float]]:
    """(SE, df) under "the rates differ by δ": the shared reference's floor at the reference rate
    that δ implies, pooled over both arms ((S·m_c + K·m_r − S·δ)/(S + K)); at δ = 0 the pooled
    rate of the p-value. Test inversion over it keeps the CI honest far from 0, where the pooled
    rate (a null-hypothesis estimate) would overstate the reference's noise."""
    se_of = stats.floored_se(diffs, resolution)

    def at(delta: float) -> tuple[float, float]:
        rate = (cond_events + k * mr - s * delta) / (s + k)
        return se_of(stats.reference_floor(min(max(rate, 0.0, -delta), 1.0, 1.0 - delta), k))
    return at


def _pair_stats(cond: np.ndarray, ref: np.ndarray, exists: np.ndarray, binary: bool, alpha: float,
                resolution: float = 0.0, shared_runs: int = 0, independent: bool = False) -> Row:
    """Statistics of one contrast from (runs × items) condition/reference arrays: paired row by
    row, or (``independent``) two unpaired samples, ``ref`` then one row per reference run.
    ``resolution``: the lattice spacing of one paired difference (see stats.crossed_test);
    ``shared_runs``: K when every row's reference is the same mean of K runs (the base model),
    whose sampling noise, for binary scores, is floored at the pooled binomial variance."""
    if independent:
        ref = ref[np.isfinite(ref).any(axis=1)]
        valid = np.isfinite(cond) & np.isfinite(ref).all(axis=0)[None, :]
        rows, cols = stats.complete_index(valid)
        c, r = cond[rows][:, cols], ref[:, cols]
    else:
        valid = np.isfinite(cond) & np.isfinite(ref)
        # The crossed test needs a balanced table; the arms' means are taken over the same cells.
        rows, cols = stats.complete_index(valid)
        c, r = cond[rows][:, cols], ref[rows][:, cols]
    mc, mr = (float(c.mean()), float(r.mean())) if c.size and r.size else (math.nan, math.nan)
    # runs behind one reference row, and the reference rows that are distinct runs or run means
    per_row = shared_runs or (1 if independent or resolution <= 0 else max(round(1 / resolution), 1))
    ref_rows = r[:1] if shared_runs else r
    n_ref = per_row * len(ref_rows)
    pooled = (len(c) * mc + n_ref * mr) / (len(c) + n_ref) if c.size and r.size else math.nan
    if independent:
        test = stats.independent_test(c, r, alpha, resolution, pooled * (1 - pooled) if binary else 0.0)
    else:
        floor = stats.reference_floor(pooled, shared_runs) if binary and shared_runs else 0.0
        test = stats.crossed_test(c - r, alpha, resolution, floor)
    rates: Row = {}
    if binary and c.size and r.size:
        se_at = None
        if shared_runs and not independent and test.n_seeds >= 2 and test.n_items >= 2:
            se_at = _floor_at_hypothesis(c - r, resolution, len(c) * mc, shared_runs, mr, len(c))
        lo, hi = stats.bounded_difference_ci(test.effect, test.se, test.df, alpha, se_at)
        test = dataclasses.replace(test, ci_lo=lo, ci_hi=hi)
        rates = dict(zip(RATE_CI_COLUMNS, (*stats.rate_interval(c, alpha, 1.0),
                                           *stats.rate_interval(ref_rows, alpha, 1.0 / per_row, n_ref))))
    return dict(**test.as_dict(), n_unscored_pairs=int((exists & ~valid).sum()),
                mean_condition=mc, mean_reference=mr,
                effect_size=_effect_size(test, mc, mr, binary) if c.size else math.nan,
                effect_size_kind="cohens_h" if binary else "d_per_observation",
                risk_difference=stats.risk_difference(mc, mr) if binary and c.size else math.nan,
                **{k: rates.get(k, math.nan) for k in RATE_CI_COLUMNS})


def wide(scores: pd.DataFrame, run_ids: Iterable[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values, exists) frames indexed by (suite, metric, judge, item_id), one column per run."""
    s = with_valid(scores[scores["run_id"].isin(set(run_ids))])
    g = s.groupby(_KEYS + ["item_id", "run_id"], sort=True)["v"].agg(["mean", "size"])
    vals = g["mean"].unstack("run_id")
    exists = g["size"].unstack("run_id").notna()
    missing = [r for r in run_ids if r not in vals.columns]
    for r in missing:  # runs with no score rows at all: every pair with them is unscored
        vals[r] = np.nan
        exists[r] = False
    return vals, exists


def prepare_runs(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs.copy()
    r["_seed"] = [_seed_key(x) for x in r["seed"]]
    r["_seed_sort"] = [-1 if x is None else x for x in r["_seed"]]
    return r.sort_values(["model", "condition", "_seed_sort", "run_id"], kind="stable")


def compare_arms(vals: pd.DataFrame, exists: pd.DataFrame, cond_runs: pd.DataFrame,
                 ref_runs: pd.DataFrame, match_seed: bool, alpha: float) -> list[Row]:
    """One row per (suite, metric, judge) comparing cond_runs to ref_runs item by item (paired by
    seed with ``match_seed``; see :func:`_reference_groups` for unequal seeds)."""
    col = {r: i for i, r in enumerate(vals.columns)}
    groups, keep, how = _reference_groups(cond_runs, ref_runs, match_seed)
    ci = np.array([col[r] for r in cond_runs["run_id"]], dtype=int)
    ri = np.array([col[r] for r in ref_runs["run_id"]], dtype=int)
    kept = ci[keep]
    group_cols = {g: np.array([col[r] for r in g], dtype=int) for g in set(groups)}
    k_shared = len(ri) if how == "shared" else 0
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
        cond = mat[:, kept].T
        ex_pair = ex[:, kept].T | ex[:, ri].any(axis=1)[None, :]
        scores = mat[:, np.concatenate([ci, ri])]
        binary = _is_binary(scores)
        if how == "independent":
            st = _pair_stats(cond, mat[:, ri].T, ex_pair, binary, alpha, _lattice(scores), independent=True)
        else:
            ref_arm = {g: nanmean_rows(mat[:, c].T) for g, c in group_cols.items()}
            ref = np.vstack([ref_arm[g] for g in groups])
            # a reference arm averages up to K runs: its mean lives on a K-times finer lattice
            resolution = _lattice(scores) / max(len(g) for g in groups)
            st = _pair_stats(cond, ref, ex_pair, binary, alpha, resolution, k_shared)
            if how.startswith("matched ") and st["inference"] == "runs × items":
                st["inference"] = f"runs × items ({how.replace('matched', 'matched seeds')})"
        rows.append(dict(suite=suite, metric=metric, judge=judge, **st))
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
    if kind == "prompt":  # the prompt-only arm against the base: its own family, the study's Holm unchanged
        return "prompt arm"
    return "positive arm" if kind == "positive" else "study"


def add_corrections(df: pd.DataFrame, family: list[str], alpha: float) -> pd.DataFrame:
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


def _reference_controls(controls: pd.DataFrame, kind: str, value: object) -> pd.DataFrame:
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
    r = prepare_runs(runs)
    rows = []
    for model, mr in r.groupby("model", sort=True):
        base = mr[mr["kind"] == "base"]
        controls = mr[mr["kind"] == "control"]
        vals, exists = wide(scores, list(mr["run_id"]))
        if vals.empty:
            continue
        trained = mr[mr["kind"].isin(["value", "control", "positive", "prompt"])]  # prompt: untrained, vs base
        for condition, cr in trained.groupby("condition", sort=True):
            kind = cr["kind"].iloc[0]
            value = cr["value"].iloc[0] if "value" in cr else None
            for ref_name, ref_runs in references(base, controls, kind, value, mr[mr["kind"] == "prompt"]):
                match = ref_name == "control"
                for row in compare_arms(vals, exists, cr, ref_runs, match, alpha):
                    rows.append(dict(model=model, condition=condition, kind=kind,
                                     value=None if pd.isna(value) else value,
                                     reference=ref_name, **row))
    return corrected(rows, CONTRAST_COLUMNS, primary_judges, alpha)


def references(base: pd.DataFrame, controls: pd.DataFrame, kind: str, value: object,
               prompts: pd.DataFrame | None = None) -> list[tuple[str, pd.DataFrame]]:
    """(reference name, its runs) a condition is compared with: the base model, the controls (a
    control arm and a prompt-only arm only against the base), and for a value condition its value's
    prompt-only run (controls.prompt_only: "training vs. prompting"), listed last so that the
    headline (`verdicts`) stays the control's, else the base's."""
    refs = [("base", base)] if len(base) else []
    ref_controls = _reference_controls(controls, kind, value)
    if kind not in ("control", "prompt") and len(ref_controls):
        refs.append(("control", ref_controls))
    if kind == "value" and prompts is not None and len(p := prompts[prompts["value"] == value]):
        refs.append(("prompt", p))
    return refs


def corrected(rows: list[Row], columns: list[str], primary_judges: dict[str, str] | None,
               alpha: float) -> pd.DataFrame:
    """Rows as a table with the primary judge marked and Holm/BH per (model, reference, family)."""
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    df["primary"] = mark_primary(df, primary_judges)
    df["family"] = [family_of(k, s) for k, s in zip(df["kind"], df["suite"])]
    df = add_corrections(df, ["model", "reference", "family"], alpha)
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


def positive_control(contrasts_df: pd.DataFrame, alpha: float = 0.05) -> list[Row]:
    """The study's measured sensitivity: per model, the planted arm against the controls (or the
    base model without controls) on the planted marker, with a verdict line."""
    out: list[Row] = []
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
