"""Statistics for paired value-induction contrasts: bootstrap CIs, permutation tests, effect sizes,
multiple-comparison correction and seed-count planning.

Data layout used throughout: a paired-difference matrix ``diffs[seed, item]`` (condition minus
reference on the same prompt item, one row per trained seed). NaN marks an item that is
unscored in either arm; every function here drops NaN rather than propagating it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

__all__ = [
    "hierarchical_bootstrap_ci",
    "paired_permutation_test",
    "paired_permutation_test_scipy",
    "wilcoxon_p",
    "seed_level_t_test",
    "cohens_d_paired",
    "cohens_h",
    "risk_difference",
    "correct",
    "variance_components",
    "ci_halfwidth",
    "seeds_needed",
]

# Same relative tolerance as scipy.stats.permutation_test: resampled statistics that equal the
# observed one in exact arithmetic but differ by rounding must count as "as extreme".
_REL_TOL = np.finfo(float).eps * 100


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def hierarchical_bootstrap_ci(
    diffs: np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    rng: np.random.Generator | int | None = None,
) -> tuple[float, float]:
    """Percentile CI of the mean paired difference, resampling seeds (rows) then items (columns).

    Items are crossed with seeds (every seed answers the same prompts), so one item resample is
    shared by all resampled seeds. The statistic is the nanmean of the resampled matrix. Resampling
    is done with multinomial counts, which is equivalent to index resampling but lets the whole
    bootstrap run as two matrix products: mean = (w·D·c) / (w·M·c) with M the non-NaN mask.
    Returns (nan, nan) when there is no finite difference.
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=float))
    mask = np.isfinite(d)
    if not mask.any():
        return (math.nan, math.nan)
    # Rows/columns that are entirely NaN carry no information; dropping them keeps the resample
    # sizes equal to the number of informative seeds/items.
    d = d[mask.any(axis=1)][:, mask.any(axis=0)]
    mask = np.isfinite(d)
    n_s, n_i = d.shape
    g = _rng(rng)
    w = g.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=n_boot).astype(float)  # (B, S)
    c = g.multinomial(n_i, np.full(n_i, 1.0 / n_i), size=n_boot).astype(float)  # (B, I)
    num = ((w @ np.where(mask, d, 0.0)) * c).sum(axis=1)
    den = ((w @ mask.astype(float)) * c).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num / den
    # A resample can, rarely, pick only NaN cells (ragged matrices); skip those.
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _sign_flip_null(d: np.ndarray, n_perm: int, g: np.random.Generator) -> tuple[np.ndarray, bool]:
    n = d.size
    if n <= 62 and 2**n <= n_perm:
        # Enumerate all 2^n sign vectors (exact test, as scipy does when n_resamples >= 2^n).
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        signs = 1.0 - 2.0 * bits
        return (signs * d).mean(axis=1), True
    signs = g.choice(np.array([-1.0, 1.0]), size=(n_perm, n))
    return (signs * d).mean(axis=1), False


def paired_permutation_test(
    diffs_per_item: np.ndarray,
    n_perm: int = 2000,
    rng: np.random.Generator | int | None = None,
) -> float:
    """Two-sided sign-flip permutation p-value for mean(diffs) == 0 (NaN dropped).

    Exact (all 2^n sign vectors) when 2^n <= n_perm, otherwise Monte Carlo with the add-one
    correction p = (1 + #{|T*| >= |T|}) / (n_perm + 1). In the exact case the result equals
    ``scipy.stats.permutation_test(..., permutation_type="samples")``; see
    :func:`paired_permutation_test_scipy`. Returns NaN when no finite difference is left.
    """
    d = np.asarray(diffs_per_item, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    obs = abs(d.mean())
    null, exact = _sign_flip_null(d, n_perm, _rng(rng))
    count = np.count_nonzero(np.abs(null) >= obs - _REL_TOL * obs)
    if exact:
        return float(min(1.0, count / null.size))
    return float(min(1.0, (count + 1) / (null.size + 1)))


def paired_permutation_test_scipy(
    diffs_per_item: np.ndarray,
    n_perm: int = 2000,
    rng: np.random.Generator | int | None = None,
) -> float:
    """Same test delegated to ``scipy.stats.permutation_test`` (one sample => sign flips)."""
    d = np.asarray(diffs_per_item, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    res = sps.permutation_test(
        (d,),
        lambda x, axis: np.mean(x, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_perm,
        alternative="two-sided",
        rng=_rng(rng),
    )
    return float(res.pvalue)


def wilcoxon_p(diffs_per_item: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value (scipy); NaN if fewer than one non-zero difference."""
    d = np.asarray(diffs_per_item, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if np.count_nonzero(d) == 0:
        return math.nan
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def seed_level_t_test(diffs: np.ndarray) -> float:
    """Two-sided one-sample t-test of per-seed mean differences (rows of diffs[seed, item]).

    Uses seeds as the unit, so run-to-run training noise is part of the error term; with the
    usual 3 seeds it has little power. NaN with fewer than 2 informative seeds or zero spread.
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=float))
    ok = np.isfinite(d)
    n = ok.sum(axis=1)
    means = np.where(ok, d, 0.0).sum(axis=1)[n > 0] / n[n > 0]
    if means.size < 2 or np.ptp(means) == 0:
        return math.nan
    return float(sps.ttest_1samp(means, 0.0).pvalue)


def cohens_d_paired(diffs: np.ndarray) -> float:
    """Cohen's d_z for paired data: mean(diff) / sd(diff, ddof=1); NaN if undefined (n<2 or sd=0)."""
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else math.nan


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h between two proportions: 2·asin(√p1) − 2·asin(√p2)."""
    if not (np.isfinite(p1) and np.isfinite(p2)):
        return math.nan
    return float(2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p2)))


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
    if ok.any():
        out[ok] = multipletests(p[ok], method=method)[1]
    return out


def variance_components(diffs: np.ndarray) -> tuple[float, float]:
    """Method-of-moments (seed_sd, item_sd) of a diffs[seed, item] matrix, for :func:`seeds_needed`.

    item_sd is the pooled within-seed SD; seed_sd² = var(seed means) − mean(item_sd²/n_i), clipped
    at 0. seed_sd is NaN with a single seed.
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=float))
    rows = [r[np.isfinite(r)] for r in d]
    rows = [r for r in rows if r.size > 0]
    within = [r.var(ddof=1) for r in rows if r.size > 1]
    item_var = float(np.mean(within)) if within else math.nan
    if len(rows) < 2:
        return (math.nan, math.sqrt(item_var) if np.isfinite(item_var) else math.nan)
    means = np.array([r.mean() for r in rows])
    n_i = np.array([r.size for r in rows])
    seed_var = max(0.0, float(means.var(ddof=1) - np.mean(item_var / n_i)))
    return (math.sqrt(seed_var), math.sqrt(item_var))


def _se(seed_sd: float, item_sd: float, n_items: int, n_seeds: float) -> float:
    # Normal approximation: each seed contributes its own training noise (seed_sd) plus the mean of
    # n_items item-level residuals (item_sd), so Var(mean diff) = seed_sd²/S + item_sd²/(S·n_items).
    # This treats item residuals as independent across seeds, i.e. it ignores an item effect
    # shared by all seeds; that effect mostly cancels in paired differences.
    return math.sqrt(seed_sd**2 / n_seeds + item_sd**2 / (n_seeds * n_items))


def ci_halfwidth(seed_sd: float, item_sd: float, n_items: int, n_seeds: int, alpha: float = 0.05) -> float:
    """Expected half-width of a (1−alpha) normal CI of the mean difference with n_seeds seeds."""
    return float(sps.norm.ppf(1 - alpha / 2) * _se(seed_sd, item_sd, n_items, n_seeds))


def seeds_needed(
    seed_sd: float,
    item_sd: float,
    n_items: int,
    effect: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> int:
    """Smallest number of seeds S giving a two-sided z-test of size alpha the requested power.

    Under Var(mean diff) = (seed_sd² + item_sd²/n_items) / S, the condition
    |effect| / SE(S) >= z_{1−alpha/2} + z_{power} gives
    S = ceil((z_{1−alpha/2} + z_{power})² · (seed_sd² + item_sd²/n_items) / effect²), at least 1.
    A normal approximation: with very few seeds a t-based plan would ask for somewhat more.
    """
    if effect == 0:
        raise ValueError("effect must be non-zero")
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    var1 = seed_sd**2 + item_sd**2 / n_items
    # Subtract a tiny slack so an exact integer solution is not bumped up by rounding error.
    return max(1, math.ceil(z**2 * var1 / effect**2 - 1e-9))


def seeds_for_halfwidth(halfwidth: float, n_seeds: int, target: float) -> int:
    """Seeds needed to shrink an observed CI half-width to `target`.

    Under the model of `_se`, both variance terms scale as 1/S, so the half-width scales as
    1/sqrt(S): S_target = ceil(S · (halfwidth / target)²).
    """
    if not (np.isfinite(halfwidth) and halfwidth > 0):
        return n_seeds
    return max(n_seeds if halfwidth <= target else 1, math.ceil(n_seeds * (halfwidth / target) ** 2 - 1e-9))


def seeds_for_power(halfwidth: float, n_seeds: int, effect: float, alpha: float = 0.05,
                    power: float = 0.8) -> int:
    """Seeds for a two-sided z-test of size alpha to detect `effect` with the given power,
    from an observed CI half-width at n_seeds (SE = halfwidth / z_{1−alpha/2}, SE ∝ 1/sqrt(S))."""
    if effect == 0 or not np.isfinite(halfwidth):
        return -1
    se1 = halfwidth / sps.norm.ppf(1 - alpha / 2) * math.sqrt(n_seeds)
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return max(1, math.ceil((z * se1 / effect) ** 2 - 1e-9))
