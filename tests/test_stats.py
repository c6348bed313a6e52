"""Reference checks of evaluation.stats against scipy / statsmodels (calibration by simulation is
in test_calibration.py)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from evaluation import stats


def _table(rng, s=4, i=60, effect=0.2, sd_seed=0.3, sd_item=0.4, sd_resid=0.5):
    return (effect + rng.normal(0, sd_seed, (s, 1)) + rng.normal(0, sd_item, (1, i))
            + rng.normal(0, sd_resid, (s, i)))


# ----------------------------------------------------------------------------- crossed test

def test_crossed_components_and_se_equal_statsmodels_reml():
    """Balanced and away from the boundary, REML for crossed random effects equals the ANOVA
    estimates; so must the standard error of the fixed intercept."""
    import statsmodels.formula.api as smf

    d = _table(np.random.default_rng(3), s=3, i=30)
    long = pd.DataFrame(dict(y=d.ravel(), seed=np.repeat(np.arange(3), 30), item=np.tile(np.arange(30), 3), g=1))
    fit = smf.mixedlm("y ~ 1", long, groups="g", re_formula="0",
                      vc_formula={"item": "0 + C(item)", "seed": "0 + C(seed)"}).fit(reml=True)
    t = stats.crossed_test(d)
    var_item, var_seed = fit.vcomp  # statsmodels orders vc_formula keys alphabetically
    assert (t.var_seed, t.var_item, t.var_resid) == pytest.approx((var_seed, var_item, fit.scale), rel=1e-3)
    assert t.effect == pytest.approx(fit.fe_params["Intercept"])
    assert t.se == pytest.approx(fit.bse_fe["Intercept"], rel=1e-3)


def test_crossed_p_and_ci_come_from_one_t():
    rng = np.random.default_rng(1)
    for _ in range(200):
        t = stats.crossed_test(_table(rng, s=int(rng.integers(2, 6)), i=int(rng.integers(5, 80)), effect=0.1))
        assert t.p_value == pytest.approx(2 * sps.t.sf(abs(t.effect) / t.se, t.df))
        assert t.ci_hi - t.effect == pytest.approx(sps.t.ppf(0.975, t.df) * t.se)
        # one procedure: the CI excludes 0 exactly when p < alpha
        assert (t.ci_lo > 0 or t.ci_hi < 0) == (t.p_value < 0.05)


def test_crossed_one_seed_makes_no_claim_across_runs():
    d = np.random.default_rng(2).normal(0.5, 1, (1, 40))
    t = stats.crossed_test(d)
    assert math.isnan(t.p_value) and t.inference == "items only (1 run)"
    ref = sps.ttest_1samp(d[0], 0).confidence_interval()
    assert (t.ci_lo, t.ci_hi) == pytest.approx((ref.low, ref.high))


def test_crossed_seed_variance_is_the_replication_unit():
    """Items cannot stand in for runs: a large seed shift makes the test wide, not significant."""
    rng = np.random.default_rng(4)
    d = np.array([[0.3], [-0.1], [0.25]]) + rng.normal(0, 0.1, (3, 500))
    t = stats.crossed_test(d)
    assert t.var_seed > 0.01 and t.p_value > 0.05 and t.df < 3
    assert sps.ttest_1samp(d.mean(axis=0), 0).pvalue < 1e-10  # what pooling items over seeds would claim


def test_crossed_drops_incomplete_items_and_empty_runs():
    d = _table(np.random.default_rng(5), s=3, i=20)
    d[1, 3] = np.nan
    full = np.vstack([d, np.full((1, 20), np.nan)])
    t = stats.crossed_test(full)
    assert (t.n_seeds, t.n_items) == (3, 19)
    assert t.effect == pytest.approx(np.delete(d, 3, axis=1).mean())
    assert stats.crossed_test(np.full((2, 3), np.nan)).inference == "none"


def test_crossed_tied_run_means_of_discrete_scores_are_not_zero_variance():
    """Two runs, 10 binary items, one different item each: the run means tie exactly. Without
    the resolution floor SE was 0 and p 0 (the demo showed such 'effects' of +0.1 [+0.1, +0.1])."""
    d = np.zeros((2, 10))
    d[0, 3] = d[1, 7] = 1.0
    assert stats.crossed_test(d).p_value == 0.0  # continuous-score reading: no spread at all
    t = stats.crossed_test(d, resolution=1.0)
    assert t.se > 0 and t.p_value > 0.05 and t.ci_lo < 0 < t.ci_hi
    # a whole-lattice effect (every item, every run) stays decisive
    assert stats.crossed_test(np.ones((2, 16)), resolution=0.5).p_value < 0.01


def test_crossed_constant_differences():
    t = stats.crossed_test(np.ones((2, 10)))
    assert (t.effect, t.ci_lo, t.ci_hi, t.p_value) == (1.0, 1.0, 1.0, 0.0)
    assert stats.crossed_test(np.zeros((3, 4))).p_value == 1.0


# ----------------------------------------------------------------------------- effect sizes

def test_effect_sizes_known_values():
    assert stats.cohens_h(0.5, 0.5) == pytest.approx(0.0)
    assert stats.cohens_h(1.0, 0.0) == pytest.approx(math.pi)
    assert stats.cohens_h(0.75, 0.25) == pytest.approx(math.pi / 3)
    assert stats.cohens_h(0.25, 0.75) == pytest.approx(-math.pi / 3)
    assert stats.risk_difference(0.7, 0.4) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- corrections

@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_correct_equals_multipletests(method):
    rng = np.random.default_rng(9)
    tied = np.round(rng.uniform(0, 0.1, 40), 2)  # many ties
    for p in [rng.uniform(0, 0.2, 30), rng.uniform(0, 1, 200), tied, np.array([0.3, 0.01])]:
        np.testing.assert_allclose(stats.correct(p, method), multipletests(p, method=method)[1])


def test_correct_nan_safe():
    p = np.array([0.01, np.nan, 0.04, 0.03])
    out = stats.correct(p, "holm")
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], multipletests(p[[0, 2, 3]], method="holm")[1])
    assert np.isnan(stats.correct([np.nan, np.nan], "fdr_bh")).all()
    with pytest.raises(ValueError):
        stats.correct(p, "bonferroni")


def test_simes_global_p():
    assert stats.simes([0.04, 0.01, 0.02]) == pytest.approx(min(3 * 0.01, 3 * 0.02 / 2, 3 * 0.04 / 3))
    p = np.random.default_rng(3).uniform(0, 0.3, 12)
    # the global test rejects whenever Hommel (its closed-testing extension) rejects anything
    assert stats.simes(p) <= multipletests(p, method="hommel")[1].min() + 1e-12
    assert stats.simes(p) <= min(1.0, 12 * p.min())
    assert stats.simes([0.01, np.nan]) == pytest.approx(0.01)
    assert math.isnan(stats.simes([np.nan]))


# ----------------------------------------------------------------------------- planning

def test_planning_floor_blocks_unreachable_targets():
    """The issue's case: item SD .3, 100 items. The floor ±.0588 is above a .043 target, and no
    number of seeds gives 80% power for an effect whose item-only power is .385."""
    comps = dict(var_seed=0.01, var_item=0.09, var_resid=0.25)
    assert stats.halfwidth_floor(0.09, 100) == pytest.approx(1.96 * 0.03, abs=1e-3)
    assert stats.seeds_for_halfwidth(**comps, n_items=100, target=0.043) is None
    assert stats.seeds_for_power(0.05, **comps, n_items=100) is None
    s = stats.seeds_for_halfwidth(**comps, n_items=100, target=0.1)
    assert stats.expected_halfwidth(**comps, n_items=100, n_seeds=s) <= 0.1 < \
        stats.expected_halfwidth(**comps, n_items=100, n_seeds=s - 1)


def test_power_at_matches_noncentral_t():
    comps = dict(var_seed=0.02, var_item=0.01, var_resid=0.3)
    p = stats.power_at(0.15, **comps, n_items=80, n_seeds=4)
    var = 0.02 / 4 + 0.01 / 80 + 0.3 / 320
    # the df the test will use: Satterthwaite at the expected mean squares, MS_seed hedged
    ms = ((0.3 + 80 * 0.02) * 3 / sps.chi2.ppf(stats.DF_BETA, 3), 0.3 + 4 * 0.01, 0.3)
    df = (ms[0] + ms[1] - ms[2]) ** 2 / (ms[0] ** 2 / 3 + ms[1] ** 2 / 79 + ms[2] ** 2 / 237)
    q = sps.t.ppf(0.975, df)
    nc = 0.15 / math.sqrt(var)
    assert p == pytest.approx(sps.nct.sf(q, df, nc) + sps.nct.cdf(-q, df, nc))
    s = stats.seeds_for_power(0.15, **comps, n_items=80)
    assert stats.power_at(0.15, **comps, n_items=80, n_seeds=s) >= 0.8 > \
        stats.power_at(0.15, **comps, n_items=80, n_seeds=s - 1)


# ----------------------------------------------------------------------------- rare references, bounded rates

def test_crossed_rare_binary_reference_counts_its_noise():
    """Issue 33's minimal case: 6 trained runs × 30 items with one event each, none in the one
    base run. The base's item noise is seen only through the item term, which 0 events estimate
    as 0: SE .0039, p .0004. Floored at the binomial variance of the pooled rate, it is not
    significant (an exact conditional test, Fisher's on 6/180 against 0/30, gives p ≈ .6)."""
    d = np.zeros((6, 30))
    d[np.arange(6), np.arange(6)] = 1.0
    bare = stats.crossed_test(d, resolution=1.0)
    assert bare.se == pytest.approx(0.0039, abs=1e-4) and bare.p_value < 0.001
    pooled = 6 / (6 * 30 + 30)  # events over both arms' cells
    t = stats.crossed_test(d, resolution=1.0, item_floor=stats.reference_floor(pooled, 1))
    assert t.effect == pytest.approx(1 / 30)
    assert t.se >= math.sqrt(pooled * (1 - pooled) / 30) and t.p_value > 0.2
    assert sps.fisher_exact([[6, 174], [0, 30]]).pvalue > 0.2
    # a floor below what the data show changes nothing
    table = _table(np.random.default_rng(6), s=3, i=40)
    assert stats.crossed_test(table, item_floor=1e-6) == stats.crossed_test(table)


def test_independent_test_counts_both_arms_run_variance():
    """Unpaired arms: SE² is each arm's MS_seed/(S·I) plus the item × condition term."""
    rng = np.random.default_rng(8)
    c, r = _table(rng, s=4, i=50), _table(rng, s=3, i=50, effect=0.0)
    t = stats.independent_test(c, r)
    msc, msr = stats.mean_squares(c), stats.mean_squares(r)
    v_d = float((c.mean(0) - r.mean(0)).var(ddof=1))
    item = max(v_d - msc[2] / 4 - msr[2] / 3, 0.0)
    assert t.se**2 == pytest.approx(msc[0] / 200 + msr[0] / 150 + item / 50)
    assert t.effect == pytest.approx(c.mean() - r.mean()) and t.inference == "two independent crossed samples"
    assert (t.ci_lo > 0 or t.ci_hi < 0) == (t.p_value < 0.05)
    # an arm with no event still counts its sampling noise through run_floor
    z = np.zeros((3, 30))
    one = z.copy()
    one[np.arange(3), np.arange(3)] = 1.0
    assert stats.independent_test(one, z[:2], resolution=1.0, run_floor=0.02 * 0.98).p_value > 0.2


def test_bounded_difference_ci_stays_in_range_and_agrees_with_p():
    lo, hi = stats.bounded_difference_ci(1.0, 0.041, 3.0)
    assert hi == 1.0 and lo == pytest.approx(1.0 - sps.t.ppf(0.975, 3) * 0.041)
    rng = np.random.default_rng(10)
    for _ in range(300):
        e, se, df = rng.uniform(-1, 1), rng.uniform(0.001, 0.6), rng.uniform(1, 50)
        p = 2 * sps.t.sf(abs(e) / se, df)
        for se_at in (None, lambda d, se=se, df=df: (se * (1 + d * d), df)):
            lo, hi = stats.bounded_difference_ci(e, se, df, 0.05, se_at)
            assert -1 <= lo <= e <= hi <= 1
            assert (lo > 0 or hi < 0) == (p < 0.05)
    # away from ±1 it is the t interval
    q = sps.t.ppf(0.975, 10)
    assert stats.bounded_difference_ci(0.1, 0.05, 10.0) == pytest.approx((0.1 - q * 0.05, 0.1 + q * 0.05))


def test_rate_interval_inside_zero_one():
    lo, hi = stats.rate_interval(np.zeros((3, 100)), resolution=1.0)
    assert lo == 0.0 and 0 < hi < 0.03  # Wilson at n = 300 cells: 1.96² / (300 + 1.96²)
    lo, hi = stats.rate_interval(np.ones((3, 10)), resolution=1.0)
    assert 0.8 < lo < hi == 1.0
    d = (np.random.default_rng(1).random((4, 80)) < 0.3).astype(float)
    lo, hi = stats.rate_interval(d, resolution=1.0)
    assert lo < d.mean() < hi
