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


def _satterthwaite(ms_s: float, ms_i: float, ms_r: float, s: int, i: int) -> tuple[float, float]:
    """(S·I·Var(mean), df) with the item term clipped at 0 and the hedged df (see DF_BETA)."""
    nu = s - 1
    item = ms_i > ms_r
    lin = ms_s + (ms_i - ms_r if item else 0.0)
    ms_s_hi = ms_s * nu / (2 * special.gammaincinv(nu / 2, DF_BETA))  # chi2.ppf(DF_BETA, nu)
    lin_hi = ms_s_hi + (ms_i - ms_r if item else 0.0)
    den = ms_s_hi**2 / nu + ((ms_i**2 / (i - 1) + ms_r**2 / (nu * (i - 1))) if item else 0.0)
    return lin, (lin_hi**2 / den if den > 0 else math.inf)


def _from_t(effect: float, se: float, df: float, alpha: float) -> tuple[float, float, float]:
    if se == 0:  # every difference identical: no sampling variation at all
        return effect, effect, (1.0 if effect == 0 else 0.0)
    # scipy.special's t functions: the same numbers as scipy.stats.t at a fraction of the call cost
    q = float(special.stdtrit(df, 1 - alpha / 2))
    return effect - q * se, effect + q * se, float(2 * special.stdtr(df, -abs(effect) / se))


def crossed_test(diffs: np.ndarray, alpha: float = 0.05, resolution: float = 0.0) -> CrossedTest:
    """t-test and CI of the mean paired difference with runs and items as crossed random factors.

    Uses the complete sub-table (see :func:`complete_table`); with S ≥ 2 runs the variance is
    (MS_seed + max(MS_item − MS_resid, 0)) / (S·I) and the reference distribution t with the
    hedged Satterthwaite df, so the CI excludes 0 exactly when p < alpha. With one run only the
    item variance is available: the CI is reported, the p-value is NaN.

    ``resolution`` is the spacing of the differences' lattice for discrete scores (1 for a rate
    against one run, 1/K against the mean of K runs; 0 for continuous scores). Run means of a
    few discrete items tie often; a tie is no evidence of zero run-to-run variance, so the
    variance of the run means is floored at that of a uniform rounding error, (resolution/I)²/12.
    """
    d = complete_table(diffs)
    s, i = d.shape if d.ndim == 2 else (0, 0)
    if s == 0 or i == 0:
        return CrossedTest(**_NONE, n_seeds=int(s), n_items=0, inference="none")
    effect = float(d.mean())
    if s == 1:
        if i < 2:
            return CrossedTest(**{**_NONE, "effect": effect}, n_seeds=1, n_items=int(i), inference="none")
        var_i = float(d.var(ddof=1))
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
    lin, df = _satterthwaite(ms_s, ms_i, ms_r, s, i)
    se = math.sqrt(max(lin, 0.0) / (s * i))
    lo, hi, p = _from_t(effect, se, df, alpha)
    return CrossedTest(effect, se, float(df), lo, hi, p, int(s), int(i),
                       var_seed=max(0.0, (ms_s - ms_r) / i), var_item=max(0.0, (ms_i - ms_r) / s),
                       var_resid=ms_r, inference="runs × items")


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
