"""Statistics for paired value-induction contrasts: the crossed (runs × items) test, effect sizes,
multiple-comparison correction and seed planning. docs/STATISTICS.md says why each method.

Data layout: a paired-difference matrix ``diffs[run, item]`` (condition minus reference on the
same prompt item, one row per trained run of the condition). Trained runs (seeds) are the unit
of replication; items are crossed with runs. NaN marks an item unscored in either arm.

The model behind every number here (Clark 1973; Baayen, Davidson & Bates 2008):

    diffs[s, i] = effect + a_s + b_i + e_si,   a ~ (0, var_seed), b ~ (0, var_item), e ~ (0, var_resid)

a_s is run-to-run (training-seed) variation, b_i the item × condition interaction (with, against
the base model, the base run's own per-item noise): it repeats in every seed and never averages
away by adding seeds. For a balanced table the ANOVA mean squares give unbiased components and
Var(mean) = var_seed/S + var_item/I + var_resid/(S·I) = (MS_seed + MS_item − MS_resid) / (S·I).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import special
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

__all__ = [
    "CrossedTest",
    "crossed_test",
    "independent_test",
    "reference_floor",
    "rate_interval",
    "bounded_difference_ci",
    "cohens_h",
    "risk_difference",
    "correct",
    "simes",
    "expected_halfwidth",
    "halfwidth_floor",
    "seeds_for_halfwidth",
    "power_at",
    "seeds_for_power",
    "DF_BETA",
]

# Satterthwaite's df for a sum of mean squares is anti-conservative when the seed mean square,
# which has only S−1 df, happens to come out small: the df then jumps exactly when t is
# inflated (type-I error .11–.14 at 2 seeds). We compute the df with MS_seed replaced by its
# one-sided (1 − DF_BETA) upper confidence limit. 0.20 keeps type-I error ≤ α from 2 seeds up
# and CI coverage within [.94, .98] from 3 seeds up on tests/test_calibration.py's grid.
DF_BETA = 0.2


@dataclass(frozen=True)
class CrossedTest:
    """One contrast's inference. ``p_value`` is NaN with a single run (run-to-run variance is
    unmeasured: the CI then covers item sampling only and no claim is made across runs)."""
    effect: float
    se: float
    df: float
    ci_lo: float
    ci_hi: float
    p_value: float
    n_seeds: int
    n_items: int
    var_seed: float
    var_item: float
    var_resid: float
    inference: str      # "runs × items" | "items only (1 run)" | "none"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_NONE = dict(effect=math.nan, se=math.nan, df=math.nan, ci_lo=math.nan, ci_hi=math.nan, p_value=math.nan,
             var_seed=math.nan, var_item=math.nan, var_resid=math.nan)


def complete_index(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(runs, items) masks of the balanced sub-table of a runs × items validity mask: runs with
    any valid cell, then items valid in every such run."""
    runs = valid.any(axis=1)
    items = valid[runs].all(axis=0) if runs.any() else np.zeros(valid.shape[1], bool)
    return np.asarray(runs), np.asarray(items)


def complete_table(diffs: np.ndarray) -> np.ndarray:
    """The balanced sub-table of a runs × items table (see :func:`complete_index`)."""
    d = np.atleast_2d(np.asarray(diffs, dtype=float))
    runs, items = complete_index(np.isfinite(d))
    out: np.ndarray = d[runs][:, items]
    return out


def mean_squares(d: np.ndarray) -> tuple[float, float, float]:
    """(MS_seed, MS_item, MS_resid) of a complete S × I table (two-way ANOVA without replication)."""
    s, i = d.shape
    g, rm, cm = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_s = i * float(((rm - g) ** 2).sum()) / (s - 1)
    ms_i = s * float(((cm - g) ** 2).sum()) / (i - 1)
    ms_r = float(((d - rm[:, None] - cm[None, :] + g) ** 2).sum()) / ((s - 1) * (i - 1))
    return ms_s, ms_i, ms_r


def _satterthwaite(ms_s: float, ms_i: float, ms_r: float, s: int, i: int,
                   item_floor: float = 0.0) -> tuple[float, float]:
    """(S·I·Var(mean), df) with the item term clipped at ``S·item_floor`` (0 by default) and the
    hedged df (see DF_BETA). A floored item term counts with the item mean square's I−1 df."""
    nu = s - 1
    est, floor = ms_i - ms_r, s * item_floor
    item = est if est > floor else floor
    ms_s_hi = ms_s * nu / (2 * special.gammaincinv(nu / 2, DF_BETA))  # chi2.ppf(DF_BETA, nu)
    lin, lin_hi = ms_s + item, ms_s_hi + item
    if est > floor and est > 0:
        den = ms_s_hi**2 / nu + ms_i**2 / (i - 1) + ms_r**2 / (nu * (i - 1))
    else:
        den = ms_s_hi**2 / nu + floor**2 / (i - 1)
    return lin, (lin_hi**2 / den if den > 0 else math.inf)


def _from_t(effect: float, se: float, df: float, alpha: float) -> tuple[float, float, float]:
    if se == 0:  # every difference identical: no sampling variation at all
        return effect, effect, (1.0 if effect == 0 else 0.0)
    # scipy.special's t functions: the same numbers as scipy.stats.t at a fraction of the call cost
    q = float(special.stdtrit(df, 1 - alpha / 2))
    return effect - q * se, effect + q * se, float(2 * special.stdtr(df, -abs(effect) / se))


def crossed_test(diffs: np.ndarray, alpha: float = 0.05, resolution: float = 0.0,
                 item_floor: float = 0.0) -> CrossedTest:
    """t-test and CI of the mean paired difference with runs and items as crossed random factors.

    Uses the complete sub-table (see :func:`complete_table`); with S ≥ 2 runs the variance is
    (MS_seed + max(MS_item − MS_resid, 0)) / (S·I) and the reference distribution t with the
    hedged Satterthwaite df, so the CI excludes 0 exactly when p < alpha. With one run only the
    item variance is available: the CI is reported, the p-value is NaN.

    ``resolution`` is the spacing of the differences' lattice for discrete scores (1 for a rate
    against one run, 1/K against the mean of K runs; 0 for continuous scores). Run means of a
    few discrete items tie often; a tie is no evidence of zero run-to-run variance, so the
    variance of the run means is floored at that of a uniform rounding error, (resolution/I)²/12.

    ``item_floor`` is the least variance of the item term (per item): for a reference arm shared
    by every row (the base run, K runs averaged), its own sampling noise repeats in every row and
    is seen only through the item term, which a rare binary reference with no event estimates as
    0. :func:`reference_floor` gives the binomial floor the contrast engine passes.
    """
    d = complete_table(diffs)
    s, i = d.shape if d.ndim == 2 else (0, 0)
    if s == 0 or i == 0:
        return CrossedTest(**_NONE, n_seeds=int(s), n_items=0, inference="none")
    effect = float(d.mean())
    if s == 1:
        if i < 2:
            return CrossedTest(**{**_NONE, "effect": effect}, n_seeds=1, n_items=int(i), inference="none")
        var_i = max(float(d.var(ddof=1)), item_floor)
        se = math.sqrt(var_i / i)
        lo, hi, _ = _from_t(effect, se, i - 1, alpha)
        return CrossedTest(effect, se, float(i - 1), lo, hi, math.nan, 1, int(i), math.nan, var_i, math.nan,
                           "items only (1 run)")
    floor = resolution**2 / (12 * i * i)  # variance of a run mean rounded to the lattice
    if i == 1:  # one item: the runs are the only replication
        se = math.sqrt(max(float(d[:, 0].var(ddof=1)), floor) / s)
        lo, hi, p = _from_t(effect, se, s - 1, alpha)
        return CrossedTest(effect, se, float(s - 1), lo, hi, p, int(s), 1, se**2 * s, math.nan, math.nan,
                           "runs × items")
    ms_s, ms_i, ms_r = mean_squares(d)
    ms_s = max(ms_s, i * floor)  # MS_seed = I · variance of the run means
    lin, df = _satterthwaite(ms_s, ms_i, ms_r, s, i, item_floor)
    se = math.sqrt(max(lin, 0.0) / (s * i))
    lo, hi, p = _from_t(effect, se, df, alpha)
    return CrossedTest(effect, se, float(df), lo, hi, p, int(s), int(i),
                       var_seed=max(0.0, (ms_s - ms_r) / i), var_item=max(0.0, (ms_i - ms_r) / s, item_floor),
                       var_resid=ms_r, inference="runs × items")


def reference_floor(rate: float, runs: int) -> float:
    """The binomial variance of one item's mean over ``runs`` binary runs at ``rate``: the least
    item-term variance a shared binary reference adds, however few events it happened to show.
    ``rate`` should pool both arms (under no effect they share it)."""
    return float(rate * (1 - rate) / max(runs, 1)) if np.isfinite(rate) else 0.0


def _hedged(ms: float, nu: int) -> float:
    return float(ms * nu / (2 * special.gammaincinv(nu / 2, DF_BETA)))  # see DF_BETA


def independent_test(cond: np.ndarray, ref: np.ndarray, alpha: float = 0.05, resolution: float = 0.0,
                     run_floor: float = 0.0) -> CrossedTest:
    """Difference of two arms' means when their runs are not paired (no common seeds): two
    independent crossed samples, runs × items each, the items shared.

    Var = MS_seed,c/(S_c·I) + MS_seed,r/(S_r·I) + max(V_D − MS_resid,c/S_c − MS_resid,r/S_r, 0)/I,
    V_D the variance over items of the arms' item-mean difference (the item × condition term);
    Welch–Satterthwaite df over those mean squares, each MS_seed hedged as in DF_BETA. One
    reference run borrows the condition's run-to-run variance (equal training noise assumed).
    ``run_floor`` floors each MS_seed (I × the variance of a run mean): for binary scores the
    pooled binomial variance, so an arm with no event still counts its sampling noise.
    """
    c, r = np.atleast_2d(np.asarray(cond, float)), np.atleast_2d(np.asarray(ref, float))
    c, r = c[np.isfinite(c).any(axis=1)], r[np.isfinite(r).any(axis=1)]
    items = np.isfinite(c).all(axis=0) & np.isfinite(r).all(axis=0) if len(c) and len(r) else []
    if len(c) < 2 or not len(r) or int(np.sum(items)) < 2:  # nothing to pair runs on: items only, or none
        return crossed_test(c - nanmean_rows(r) if len(r) else np.empty((0, 0)), alpha, resolution)
    c, r = c[:, items], r[:, items]
    (sc, i), sr = c.shape, len(r)
    floor = max(resolution**2 / (12 * i), run_floor)
    msc_s, _, msc_r = mean_squares(c)
    msc_s = max(msc_s, floor)
    if sr >= 2:
        msr_s, _, msr_r = mean_squares(r)
        # (coefficient, mean square, its df) of Var(mean difference) = sum of coef·MS
        seed = [(1 / (sc * i), msc_s, sc - 1), (1 / (sr * i), max(msr_s, floor), sr - 1)]
        resid = [(-1 / (sc * i), msc_r, (sc - 1) * (i - 1)), (-1 / (sr * i), msr_r, (sr - 1) * (i - 1))]
    else:
        seed = [((1 / sc + 1 / sr) / i, msc_s, sc - 1)]
        resid = [(-(1 / sc + 1 / sr) / i, msc_r, (sc - 1) * (i - 1))]
    v_d = float((c.mean(axis=0) - r.mean(axis=0)).var(ddof=1))
    item = [(1 / i, v_d, i - 1), *resid]
    item_var = sum(k * m for k, m, _ in item)
    terms = seed + (item if item_var > 0 else [])
    var = sum(k * m for k, m, _ in terms)
    hi = [(k * _hedged(m, nu), nu) for k, m, nu in seed] + [(k * m, nu) for k, m, nu in terms[len(seed):]]
    den = sum(x**2 / nu for x, nu in hi)
    df = sum(x for x, _ in hi) ** 2 / den if den > 0 else math.inf
    effect, se = float(c.mean() - r.mean()), math.sqrt(max(var, 0.0))
    lo, up, p = _from_t(effect, se, df, alpha)
    return CrossedTest(effect, se, float(df), lo, up, p, int(sc), int(i),
                       var_seed=max(0.0, (msc_s - msc_r) / i), var_item=max(0.0, item_var * i),
                       var_resid=msc_r, inference="two independent crossed samples")


def nanmean_rows(m: np.ndarray) -> np.ndarray:
    """Column-wise nanmean over rows without the empty-slice warning (all-NaN -> NaN)."""
    ok = np.isfinite(m)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(n > 0, np.where(ok, m, 0.0).sum(axis=0) / n, np.nan))


def rate_interval(scores: np.ndarray, alpha: float = 0.05, resolution: float = 0.0,
                  runs: int | None = None) -> tuple[float, float]:
    """CI inside [0, 1] for the mean of a binary arm (runs × items): the Wilson score interval at
    Kish's effective sample size n_eff = p(1−p)/SE², SE from :func:`crossed_test` on the arm's own
    table (so run-to-run and item variance are in it), capped at the n = runs·items cells (n at
    p = 0 or 1, where SE says nothing), with a t quantile (Korn & Graubard 1998's recipe for
    proportions from complex samples). ``runs``: how many runs the
    rows stand for (one row of K averaged runs: K)."""
    t = crossed_test(scores, alpha, resolution)
    p = t.effect
    if not np.isfinite(p) or t.n_items == 0:
        return math.nan, math.nan
    n = float((runs or t.n_seeds) * t.n_items)
    binom = p * (1 - p) / n  # what independent cells would give: known once p is, unlike the rest
    var = max(t.se**2, binom) if 0 < p < 1 else binom
    n_eff = p * (1 - p) / var if var > 0 else n
    # the crossed test's df when its SE is used; a normal quantile when independent cells' binomial
    # variance (known once p is) is
    df = t.df if var > binom and np.isfinite(t.df) else math.inf
    q = float(special.stdtrit(df, 1 - alpha / 2)) if np.isfinite(df) else float(special.ndtri(1 - alpha / 2))
    k = q * q / n_eff
    mid, half = (p + k / 2) / (1 + k), q * math.sqrt(p * (1 - p) / n_eff + k / (4 * n_eff)) / (1 + k)
    return (0.0 if p == 0 else max(0.0, mid - half)), (1.0 if p == 1 else min(1.0, mid + half))


def floored_se(diffs: np.ndarray, resolution: float = 0.0) -> Callable[[float], tuple[float, float]]:
    """For a runs × items table (S, I ≥ 2), the map item_floor -> (SE, df) that
    :func:`crossed_test` would give with that ``item_floor``: the mean squares are computed once, so
    a CI can be found by test inversion over hypotheses that imply different floors."""
    d = complete_table(diffs)
    s, i = d.shape
    ms_s, ms_i, ms_r = mean_squares(d)
    ms_s = max(ms_s, resolution**2 / (12 * i))

    def at(item_floor: float) -> tuple[float, float]:
        lin, df = _satterthwaite(ms_s, ms_i, ms_r, s, i, item_floor)
        return math.sqrt(max(lin, 0.0) / (s * i)), df
    return at


def bounded_difference_ci(effect: float, se: float, df: float, alpha: float = 0.05,
                          se_at: Callable[[float], tuple[float, float]] | None = None) -> tuple[float, float]:
    """CI inside [−1, 1] for a difference of two rates: the δ the crossed t-test does not reject,
    with its SE capped at √(1 − δ²), the largest SD any estimate of a rate difference δ can have
    (two [0, 1] means with rates p₁ − p₂ = δ: SD ≤ √(p₁(1−p₁)) + √(p₂(1−p₂)) ≤ √(1 − δ²)).

    ``se_at(δ)`` gives (SE, df) under the hypothesis δ (a reference floor at the rate δ implies);
    it must give (se, df) at δ = 0. Without it SE and df are the observed ones and the set is
    solved in closed form. Either way the test at δ = 0 is the reported t-test: the CI excludes 0
    exactly when p < alpha. Away from ±1 the cap never binds."""
    if not (np.isfinite(effect) and np.isfinite(se) and np.isfinite(df)):
        return math.nan, math.nan
    e = min(1.0, max(-1.0, effect))
    if se == 0:
        return e, e
    if se_at is None:
        q = float(special.stdtrit(df, 1 - alpha / 2))
        b = math.sqrt(max(1 - se * se, 0.0))  # |δ| ≤ b: the cap does not bind
        root = q * math.sqrt(1 + q * q - e * e)  # |e − δ| ≤ q√(1 − δ²) is a quadratic in δ
        r1, r2 = (e - root) / (1 + q * q), (e + root) / (1 + q * q)
        return max(e - q * se, min(-b, r1)), min(e + q * se, max(b, r2))

    def rejects(delta: float) -> bool:
        s_d, df_d = se_at(delta)
        return abs(e - delta) > float(special.stdtrit(df_d, 1 - alpha / 2)) * min(s_d, math.sqrt(max(1 - delta**2, 0)))

    def edge(inside: float, outside: float) -> float:  # bisection between an accepted and a rejected δ
        for _ in range(40):
            mid = (inside + outside) / 2
            inside, outside = (inside, mid) if rejects(mid) else (mid, outside)
        return inside

    # Each end is searched between an accepted and a rejected δ, with 0 on its own side of the
    # bracket: the CI excludes 0 exactly when the test at 0 rejects.
    zero_out = rejects(0.0)
    lo = (edge(e, 0.0) if zero_out else edge(0.0, -1.0)) if e > 0 else edge(e, -1.0)
    hi = (edge(e, 0.0) if zero_out else edge(0.0, 1.0)) if e < 0 else edge(e, 1.0)
    return lo, hi


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h between two proportions: 2·asin(√p1) − 2·asin(√p2)."""
    if not (np.isfinite(p1) and np.isfinite(p2)):
        return math.nan
    return float(2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p2)))


def cohen_kappa(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> float:
    """Cohen's kappa between two raters' labels of the same items (scikit-learn's
    ``cohen_kappa_score``); NaN when there are no items or only one label occurs in both
    (chance agreement is then 1 and kappa is undefined)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} labels against {len(b)}")
    if not a or len(set(a) | set(b)) < 2:
        return math.nan
    from sklearn.metrics import cohen_kappa_score  # deferred: scikit-learn takes about a second to import

    return float(cohen_kappa_score(a, b))


def risk_difference(p1: float, p2: float) -> float:
    """Difference of two proportions, p1 − p2."""
    return float(p1 - p2)


def correct(pvalues: Sequence[float] | np.ndarray, method: str = "holm") -> np.ndarray:
    """Multiple-comparison-adjusted p-values via statsmodels ``multipletests``.

    ``method`` is "holm" (family-wise error) or "fdr_bh" (false discovery rate). NaN entries are
    left out of the family and stay NaN in the output.
    """
    if method not in {"holm", "fdr_bh"}:
        raise ValueError(f"method must be 'holm' or 'fdr_bh', got {method!r}")
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    if ok.sum() == 1:  # a family of one is its own correction
        out[ok] = p[ok]
    elif ok.any():
        out[ok] = _holm(p[ok]) if method == "holm" else multipletests(p[ok], method=method)[1]
    return out


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, max_{j<=i} (m - j + 1) p_(j) capped at 1: statsmodels'
    formula (tests/test_stats.py compares the two), without the gc.collect() its Holm runs on every
    call, which took 40% of an analysis in a process holding torch."""
    order = np.argsort(p)
    out = np.empty_like(p)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1)))
    return out


def simes(pvalues: Sequence[float] | np.ndarray) -> float:
    """Simes' global p-value min_k(m·p_(k)/k) for "every hypothesis is null" (NaN ignored).

    Valid under independence and positive regression dependence (Simes 1986; Sarkar 1998); it is
    the first step of Hommel's procedure and never larger than the Bonferroni minimum.
    """
    p = np.sort(np.asarray(pvalues, dtype=float)[np.isfinite(pvalues)])
    if p.size == 0:
        return math.nan
    return float(min(1.0, (p.size * p / np.arange(1, p.size + 1)).min()))


# ----------------------------------------------------------------------------- seed planning

def _plan_var_df(var_seed: float, var_item: float, var_resid: float, n_items: int, n_seeds: int) -> tuple[float, float]:
    """Var(mean) and the df the test will use at n_seeds, from the expected mean squares."""
    s, i = n_seeds, max(n_items, 2)
    var = var_seed / s + var_item / i + var_resid / (s * i)
    if s < 2:
        return var, math.nan
    return var, _satterthwaite(var_resid + i * var_seed, var_resid + s * var_item, var_resid, s, i)[1]


def expected_halfwidth(var_seed: float, var_item: float, var_resid: float, n_items: int, n_seeds: int,
                       alpha: float = 0.05) -> float:
    """Expected CI half-width with n_seeds runs (t quantile at the expected df; NaN below 2 runs)."""
    var, df = _plan_var_df(var_seed, var_item, var_resid, n_items, n_seeds)
    if not np.isfinite(df):
        return math.nan
    return float(sps.t.ppf(1 - alpha / 2, df) * math.sqrt(var))


def halfwidth_floor(var_item: float, n_items: int, alpha: float = 0.05) -> float:
    """The half-width no number of seeds goes below: the item × condition term z·√(var_item/I)."""
    return float(sps.norm.ppf(1 - alpha / 2) * math.sqrt(max(var_item, 0.0) / n_items))


def seeds_for_halfwidth(var_seed: float, var_item: float, var_resid: float, n_items: int, target: float,
                        alpha: float = 0.05, max_seeds: int = 1000) -> int | None:
    """Smallest number of runs whose expected half-width is ≤ target; None when the item floor
    alone is ≥ target (more items, not more seeds) or more than max_seeds would be needed."""
    if halfwidth_floor(var_item, n_items, alpha) >= target:
        return None
    return _fewest_seeds(lambda s: expected_halfwidth(var_seed, var_item, var_resid, n_items, s, alpha) <= target,
                         max_seeds)


def power_at(effect: float, var_seed: float, var_item: float, var_resid: float, n_items: int, n_seeds: int,
             alpha: float = 0.05) -> float:
    """Power of the two-sided crossed t-test to detect `effect` with n_seeds runs (noncentral t)."""
    var, df = _plan_var_df(var_seed, var_item, var_resid, n_items, n_seeds)
    if not np.isfinite(df) or var <= 0:
        return math.nan
    nc, q = abs(effect) / math.sqrt(var), sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(q, df, nc) + sps.nct.cdf(-q, df, nc))


def seeds_for_power(effect: float, var_seed: float, var_item: float, var_resid: float, n_items: int,
                    alpha: float = 0.05, power: float = 0.8, max_seeds: int = 1000) -> int | None:
    """Smallest number of runs giving `power` against the smallest effect of interest `effect`;
    None when even infinitely many runs would not (the item term alone is too large)."""
    if effect == 0:
        raise ValueError("effect must be non-zero")
    z = sps.norm.ppf(1 - alpha / 2)
    if var_item > 0 and sps.norm.sf(z - abs(effect) / math.sqrt(var_item / n_items)) < power:
        return None
    return _fewest_seeds(lambda s: power_at(effect, var_seed, var_item, var_resid, n_items, s, alpha) >= power,
                         max_seeds)


def _fewest_seeds(enough: Callable[[int], bool], max_seeds: int) -> int | None:
    """Smallest S in [2, max_seeds] with enough(S), for a goal that more runs only bring closer
    (half-width falls and power rises with S): bisection, not a scan of up to max_seeds noncentral-t
    evaluations per contrast."""
    lo, hi = 1, 2  # doubling, then bisection between the last miss and the first hit
    while not enough(hi):
        if hi >= max_seeds:
            return None
        lo, hi = hi, min(2 * hi, max_seeds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi
