import math

import numpy as np
import pandas as pd

from evaluation.analyze import power_table
from evaluation.stats import ci_halfwidth, seeds_for_halfwidth, seeds_for_power, seeds_needed


def test_halfwidth_scaling_matches_the_variance_model():
    hw2 = ci_halfwidth(0.1, 0.5, 50, 2)
    hw8 = ci_halfwidth(0.1, 0.5, 50, 8)
    assert math.isclose(hw2 / hw8, 2.0)
    assert seeds_for_halfwidth(hw2, 2, hw8) == 8
    assert seeds_for_halfwidth(hw8, 8, hw2) == 8  # already narrow enough: keep what we have


def test_seeds_for_power_agrees_with_variance_components():
    seed_sd, item_sd, n = 0.2, 0.6, 40
    hw = ci_halfwidth(seed_sd, item_sd, n, 3)
    for effect in (0.05, 0.1, 0.3):
        assert seeds_for_power(hw, 3, effect) == seeds_needed(seed_sd, item_sd, n, effect)


def test_power_table_rows():
    c = pd.DataFrame([{"model": "m", "condition": "value-empathy", "reference": "control", "suite": "values",
                       "metric": "expresses/empathy", "judge": "j", "n_seeds": 2, "ci_lo": 0.0, "ci_hi": 0.2,
                       "effect": 0.1}])
    t = power_table(c, target_halfwidth=0.05)
    assert t["ci_halfwidth"].iloc[0] == 0.1 and t["seeds_for_target"].iloc[0] == 8
    assert t["seeds_for_power"].iloc[0] >= 2
