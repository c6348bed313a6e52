"""Calibration of the pooled-across-models test (evaluation/pooled.py) by simulation.

Each simulated study has k models; model j's (seeds × items) table of paired differences follows
the crossed model of tests/test_calibration.py around its own true effect μ + u_j, u_j ~ N(0, τ²)
(between-model heterogeneity), and goes through `stats.crossed_test` as in a real analysis. The k
per-model (effect, se, var_item, n_items) are pooled by `pooled.random_effects`. Items are either
drawn afresh per model or shared: the same item × condition effect in every model (every model
answers the same prompts). Measured: type-I error (μ = 0) and 95% CI coverage of μ.

`pytest tests/test_calibration_pooled.py -s` prints the table (bench/pooled_calibration.py too).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from evaluation import stats
from evaluation.pooled import random_effects
from evaluation.stage_test import stage_test

ALPHA, N_SIM = 0.05, 1000
SLACK = 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / N_SIM)   # one-sided binomial slack, ≈ .017
SEEDS, ITEMS, SD_SEED, SD_ITEM, SD_RESID, EFFECT = 3, 50, 0.05, 0.1, 0.5, 0.1
# τ = 0, about the per-model SE (≈ .05), and four times it
GRID = list(itertools.product((2, 3, 5, 8), (0.0, 0.05, 0.2), ("independent", "shared")))


def simulate_pool(rng: np.random.Generator, k: int, tau: float, items: str, mu: float,
                  n: int = N_SIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n pooled tests: (p-values, CI lows, CI highs)."""
    p, lo, hi = np.empty(n), np.empty(n), np.empty(n)
    for s in range(n):
        shared_b = rng.normal(0, SD_ITEM, (1, ITEMS))
        est = []
        for _ in range(k):
            b = shared_b if items == "shared" else rng.normal(0, SD_ITEM, (1, ITEMS))
            d = (mu + rng.normal(0, tau) + rng.normal(0, SD_SEED, (SEEDS, 1)) + b
                 + rng.normal(0, SD_RESID, (SEEDS, ITEMS)))
            t = stats.crossed_test(d, ALPHA)
            est.append((t.effect, t.se, t.var_item / t.n_items))
        e, se, item = map(np.array, zip(*est))
        r = random_effects(e, se, item, ALPHA)
        p[s], lo[s], hi[s] = r.p_value, r.ci_lo, r.ci_hi
    return p, lo, hi


def cell(k: int, tau: float, items: str, n: int = N_SIM) -> dict[str, float]:
    key = f"{k}{tau}{items}".encode()
    p, _, _ = simulate_pool(np.random.default_rng([0, *key]), k, tau, items, 0.0, n)
    _, lo, hi = simulate_pool(np.random.default_rng([1, *key]), k, tau, items, EFFECT, n)
    return {"type1": float(np.mean(p <= ALPHA)), "coverage": float(np.mean((lo <= EFFECT) & (EFFECT <= hi))),
            "median_halfwidth": float(np.median(hi - lo) / 2)}


def grid_table(n: int = N_SIM) -> pd.DataFrame:
    return pd.DataFrame([dict(models=k, tau=tau, items=it, **cell(k, tau, it, n)) for k, tau, it in GRID])


def describe(t: pd.DataFrame) -> str:
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        return (f"pooled across models: type-I error (α = {ALPHA}, bound {ALPHA + SLACK:.3f}), 95% CI coverage and "
                f"median CI half-width, {N_SIM} studies per cell; per model {SEEDS} seeds × {ITEMS} items, SD seed "
                f"{SD_SEED}, item×condition {SD_ITEM}, residual {SD_RESID}; effect {EFFECT}\n"
                + t.pivot_table(index=["items", "models"], columns="tau",
                                values=["type1", "coverage", "median_halfwidth"]).round(3).to_string())


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    t = grid_table()
    print("\n" + describe(t))
    return t


def test_pooled_type1_error_is_at_most_alpha(grid):
    bad = grid[grid["type1"] > ALPHA + SLACK]
    assert bad.empty, bad


def test_pooled_coverage_from_five_models(grid):
    g = grid[grid["models"] >= 5]
    bad = g[(g["coverage"] < 0.92) | (g["coverage"] > 0.98)]
    assert bad.empty, bad


def test_two_and_three_models_are_conservative(grid):
    """k − 1 df for the between-model variance and q floored at 1: with 2 models the interval is
    very wide (t with 1 df), with 3 it over-covers when models agree (τ ≤ SE). Never short."""
    g = grid[grid["models"] <= 3]
    assert (g["coverage"] >= 0.95).all() and (g["type1"] <= ALPHA).all(), g
    two, three = grid[grid["models"] == 2], grid[grid["models"] == 3]
    assert two["median_halfwidth"].min() > 2 * three["median_halfwidth"].median()


def test_plain_hksj_without_the_shared_item_term_over_rejects():
    """The safety net's own check: pooled as independent estimates (plain HKSJ, no shared-item
    term), 8 models answering the same items reject a true null far above α."""
    rng = np.random.default_rng(7)
    p = []
    for _ in range(400):
        b = rng.normal(0, SD_ITEM, (1, ITEMS))
        est = [stats.crossed_test(rng.normal(0, SD_SEED, (SEEDS, 1)) + b + rng.normal(0, SD_RESID, (SEEDS, ITEMS)))
               for _ in range(8)]
        p.append(random_effects([t.effect for t in est], [t.se for t in est], alpha=ALPHA, floor_scale=False).p_value)
    assert np.mean(np.array(p) <= ALPHA) > 2 * ALPHA


@pytest.mark.parametrize("n_instruct, n_other", [(2, 2), (1, 3)])
def test_value_by_stage_test_type1_error(n_instruct, n_other):
    """No stage effect, between-model heterogeneity τ = .05: the value × stage test (through
    evaluation.stage_test on a contrasts table) rejects at most α + slack."""
    rng = np.random.default_rng([n_instruct, n_other])
    models = [f"i{j}" for j in range(n_instruct)] + [f"o{j}" for j in range(n_other)]
    stages = {m: "instruct" if m.startswith("i") else "base" for m in models}
    n, p = 500, []
    for _ in range(n):
        b = rng.normal(0, SD_ITEM, (1, ITEMS))  # the same items in every model
        rows = []
        for m in models:
            t = stats.crossed_test(rng.normal(0, 0.05) + rng.normal(0, SD_SEED, (SEEDS, 1)) + b
                                   + rng.normal(0, SD_RESID, (SEEDS, ITEMS)))
            rows.append(dict(model=m, kind="value", value="empathy", suite="values", metric="expresses/empathy",
                             reference="control", primary=True, effect=t.effect, se=t.se, df=t.df,
                             p_value=t.p_value, var_item=t.var_item, n_items=t.n_items))
        p.append(stage_test(pd.DataFrame(rows), stages)["p_value"].iloc[0])
    type1 = float(np.mean(np.array(p) <= ALPHA))
    print(f"\nvalue × stage test, {n_instruct} instruct vs {n_other} other models: type-I error {type1:.3f}")
    assert type1 <= ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / n)
