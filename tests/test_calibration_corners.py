"""Calibration in the two corners where the crossed test over-rejected (issue 33, item 9), and
coverage of the bounded rate intervals near 0 and 1 (item 6). The simulations are
bench/calibration_corners.py's (which prints the full before/after tables), at modest replication:
each bound is α plus 2.5 binomial SDs of the Monte-Carlo estimate, as in test_calibration.py.
Before the fix these cells gave type-I .10–.29 (rare rates vs base) and .17 (5 vs 2 seeds).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from evaluation import stats

ALPHA = 0.05
_spec = importlib.util.spec_from_file_location(
    "calibration_corners", Path(__file__).resolve().parents[1] / "bench" / "calibration_corners.py")
assert _spec is not None and _spec.loader is not None
corners = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corners)


def _bound(n: int) -> float:
    return ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / n)


def test_rare_binary_rates_against_base_keep_type1_error():
    """30 items, rates .01–.05, 6 and 10 seeds: the cells that rejected a true null 10–29% of the
    time when a base run without events left its noise out of the SE."""
    n = 300
    t = corners.rare_against_base(n, rates=(0.01, 0.02, 0.05), seeds=(6, 10), items=(30,))
    assert (t["mc_n"] == n).all()
    bad = t[t["type1"] > _bound(n)]
    assert bad.empty, bad
    assert t["base_no_event"].min() > 0.2  # the trap is there: the base often has no event


def test_without_the_reference_floor_the_rare_cell_over_rejects():
    """The same cell through crossed_test without item_floor: the safety net's case is real."""
    rng = np.random.default_rng(5)
    n, s, i, rate = 300, 10, 30, 0.02
    d = (rng.random((n, s, i)) < rate).astype(float) - (rng.random((n, 1, i)) < rate).astype(float)
    p = np.array([stats.crossed_test(x, ALPHA, 1.0).p_value for x in d])
    assert np.mean(p <= ALPHA) > 0.15


def test_unequal_seed_counts_use_matched_seeds_or_independent_samples():
    n = 400
    t = corners.unequal_seeds(n, cases=((5, 2), (3, 0)))
    assert list(t["inference"]) == ["runs × items (matched seeds 2 of 5)", "two independent crossed samples"]
    bad = t[(t["type1"] > _bound(n)) | (t["se2_over_var"] < 0.8)]
    assert bad.empty, bad


def test_bounded_rate_intervals_cover_near_0_and_1():
    """3 seeds × 100 items, rates .02 and .98: each arm's rate CI covers its expected rate 92–98%
    of the time (MC SD ≈ .011 at n = 400); no difference CI leaves [−1, 1]."""
    t = corners.bounded_coverage(400, pairs=((0.02, 0.02), (0.98, 0.98), (0.98, 0.02)), seeds=(3,))
    assert t["cond_cover"].between(0.92, 0.98).all(), t
    assert (t["base_cover"] >= 0.92).all() and (t["diff_cover"] >= 0.92).all(), t
    assert (t["diff_outside"] == 0).all()


def test_positive_control_interval_stays_inside_minus_one_to_one():
    """The demo's "+1.000 (95% CI +0.919 to +1.081)": every trained run has the marker, the base none."""
    cond, base = np.ones((1, 3, 10)), np.zeros((1, 1, 10))
    row = corners.compare(cond, base, [0, 1, 2], [-1], False).iloc[0]
    assert row["effect"] == 1.0 and row["ci_hi"] <= 1.0 and row["ci_lo"] > 0 and row["p_value"] < ALPHA
    assert 0 < row["rate_ci_lo"] < row["rate_ci_hi"] <= 1.0 and 0.0 <= row["ref_rate_ci_lo"] < row["ref_rate_ci_hi"] < 1


@pytest.mark.parametrize("seeds", [3, 5])
def test_balanced_seeds_are_paired_as_before(seeds):
    """Equal seed sets: every run kept and paired by seed, the inference unchanged."""
    t = corners.unequal_seeds(20, cases=((seeds, seeds),))
    assert t["inference"].iloc[0] == "runs × items"
