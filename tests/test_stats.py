"""Reference checks of evaluation.stats against scipy / statsmodels."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from evaluation import stats


# ----------------------------------------------------------------------------- permutation test

def test_permutation_exact_equals_scipy():
    rng = np.random.default_rng(0)
    for n, shift in [(6, 0.0), (8, 0.8), (10, 0.3)]:
        d = rng.normal(shift, 1.0, n)
        # 2**n <= n_perm: both enumerate every sign vector, so the p-values must be identical.
        ours = stats.paired_permutation_test(d, n_perm=2000, rng=1)
        ref = stats.paired_permutation_test_scipy(d, n_perm=2000, rng=1)
        assert ours == pytest.approx(ref, abs=1e-12)


def test_permutation_exact_with_ties_and_zero_effect():
    d = np.array([1.0, -1.0, 2.0, -2.0, 0.0])
    assert stats.paired_permutation_test(d, 2000) == pytest.approx(1.0)
    d = np.array([1.0, 1.0, 1.0, 1.0, 1.0])  # all positive: 2 of 32 sign vectors as extreme
    assert stats.paired_permutation_test(d, 2000) == pytest.approx(2 / 32)
    assert stats.paired_permutation_test_scipy(d, 2000) == pytest.approx(2 / 32)


def test_permutation_monte_carlo_matches_scipy_within_mc_error():
    rng = np.random.default_rng(3)
    d = rng.normal(0.25, 1.0, 40)
    n_perm = 20000
    ours = stats.paired_permutation_test(d, n_perm=n_perm, rng=5)
    ref = stats.paired_permutation_test_scipy(d, n_perm=n_perm, rng=6)
    se = math.sqrt(ref * (1 - ref) / n_perm)
    assert 0.01 < ref < 0.5  # a regime where the comparison is informative
    assert abs(ours - ref) < 5 * se + 1e-3


def test_permutation_add_one_and_nan():
    d = np.full(30, 1.0)
    p = stats.paired_permutation_test(d, n_perm=999, rng=0)
    assert p == pytest.approx(1 / 1000)  # never zero: add-one correction
    d_nan = np.concatenate([np.random.default_rng(1).normal(0.3, 1, 9), [np.nan, np.nan]])
    assert stats.paired_permutation_test(d_nan, 2000, 0) == stats.paired_permutation_test(
        d_nan[:9], 2000, 0)
    assert math.isnan(stats.paired_permutation_test(np.array([np.nan]), 100, 0))


def test_wilcoxon_matches_scipy():
    d = np.random.default_rng(2).normal(0.4, 1, 25)
    assert stats.wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert math.isnan(stats.wilcoxon_p(np.zeros(5)))


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_one_seed_matches_scipy_percentile():
    x = np.random.default_rng(4).normal(0.5, 2.0, 300)
    lo, hi = stats.hierarchical_bootstrap_ci(x[None, :], n_boot=5000, alpha=0.05, rng=0)
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=5000, rng=1,
                        confidence_level=0.95).confidence_interval
    width = ref.high - ref.low
    assert lo == pytest.approx(ref.low, abs=0.05 * width)
    assert hi == pytest.approx(ref.high, abs=0.05 * width)


def test_bootstrap_equals_naive_index_resampling_with_nan():
    """The count-weighted matrix trick must equal nanmean of the explicitly resampled matrix."""
    rng = np.random.default_rng(7)
    d = rng.normal(0.2, 1.0, (4, 25))
    d[rng.random(d.shape) < 0.15] = np.nan
    n_boot, alpha = 300, 0.1
    lo, hi = stats.hierarchical_bootstrap_ci(d, n_boot=n_boot, alpha=alpha, rng=11)
    g = np.random.default_rng(11)
    w = g.multinomial(4, np.full(4, 0.25), size=n_boot)
    c = g.multinomial(25, np.full(25, 1 / 25), size=n_boot)
    boot = []
    for wb, cb in zip(w, c):
        si, ii = np.repeat(np.arange(4), wb), np.repeat(np.arange(25), cb)
        m = d[si][:, ii]
        if np.isfinite(m).any():
            boot.append(np.nanmean(m))
    ref_lo, ref_hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=1e-12)


def test_bootstrap_widens_with_seed_variance():
    rng = np.random.default_rng(8)
    items = rng.normal(0, 1, (1, 200))
    no_seed = items + rng.normal(0, 0.3, (5, 200))
    with_seed = no_seed + rng.normal(0, 2.0, (5, 1))  # run-level shifts shared by all items
    w0 = np.diff(stats.hierarchical_bootstrap_ci(no_seed, 2000, 0.05, 0))[0]
    w1 = np.diff(stats.hierarchical_bootstrap_ci(with_seed, 2000, 0.05, 0))[0]
    assert w1 > 2 * w0
    assert all(math.isnan(v) for v in stats.hierarchical_bootstrap_ci(np.full((2, 3), np.nan)))


# ----------------------------------------------------------------------------- effect sizes

def test_effect_sizes_known_values():
    assert stats.cohens_h(0.5, 0.5) == pytest.approx(0.0)
    assert stats.cohens_h(1.0, 0.0) == pytest.approx(math.pi)
    assert stats.cohens_h(0.75, 0.25) == pytest.approx(math.pi / 3)
    assert stats.cohens_h(0.25, 0.75) == pytest.approx(-math.pi / 3)
    assert stats.risk_difference(0.7, 0.4) == pytest.approx(0.3)
    assert stats.cohens_d_paired(np.array([1.0, 2.0, 3.0])) == pytest.approx(2.0)
    assert math.isnan(stats.cohens_d_paired(np.array([1.0, 1.0])))
    assert math.isnan(stats.cohens_d_paired(np.array([1.0])))


def test_seed_level_t_test():
    d = np.array([[1.0, 2.0], [2.0, 3.0], [3.0, np.nan]])
    assert stats.seed_level_t_test(d) == pytest.approx(sps.ttest_1samp([1.5, 2.5, 3.0], 0).pvalue)
    assert math.isnan(stats.seed_level_t_test(np.ones((1, 5))))


# ----------------------------------------------------------------------------- corrections

@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_correct_equals_multipletests(method):
    p = np.random.default_rng(9).uniform(0, 0.2, 30)
    np.testing.assert_allclose(stats.correct(p, method), multipletests(p, method=method)[1])


def test_correct_nan_safe():
    p = np.array([0.01, np.nan, 0.04, 0.03])
    out = stats.correct(p, "holm")
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], multipletests(p[[0, 2, 3]], method="holm")[1])
    assert np.isnan(stats.correct([np.nan, np.nan], "fdr_bh")).all()
    with pytest.raises(ValueError):
        stats.correct(p, "bonferroni")


# ----------------------------------------------------------------------------- planning

def test_seeds_needed_monotone_and_consistent():
    kw = dict(seed_sd=0.05, item_sd=0.4, n_items=200)
    s80 = stats.seeds_needed(effect=0.05, power=0.8, **kw)
    s95 = stats.seeds_needed(effect=0.05, power=0.95, **kw)
    assert s95 > s80 >= 1
    assert stats.seeds_needed(effect=0.10, power=0.8, **kw) < s80
    assert stats.seeds_needed(effect=0.05, power=0.8, alpha=0.01, **kw) > s80
    # At the returned S the z-test reaches the requested power; at S-1 it does not.
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    half = lambda s: stats.ci_halfwidth(n_seeds=s, alpha=0.05, **kw)  # noqa: E731
    se = lambda s: half(s) / sps.norm.ppf(0.975)  # noqa: E731
    assert 0.05 / se(s80) >= z
    assert 0.05 / se(s80 - 1) < z
    assert half(4 * s80) == pytest.approx(half(s80) / 2)


def test_variance_components_recovers_simulation():
    rng = np.random.default_rng(10)
    d = rng.normal(0, 0.2, (400, 1)) + rng.normal(0, 1.0, (400, 50))
    seed_sd, item_sd = stats.variance_components(d)
    assert seed_sd == pytest.approx(0.2, abs=0.05)
    assert item_sd == pytest.approx(1.0, abs=0.05)
