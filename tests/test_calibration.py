"""Calibration of the study's inference by simulation: data with a known truth go through the
same code the report uses, and type-I error, CI coverage, the A/A check, the whole-matrix
co-expression test and seed planning are measured against it. Fixed seeds: deterministic.

`pytest tests/test_calibration.py -s` prints the grid table.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from evaluation import analyze, stats
from evaluation.types import RUN_COLUMNS, SCORE_COLUMNS

ALPHA = 0.05
N_SIM = 1000
SLACK = 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / N_SIM)   # one-sided binomial slack, ≈ .017
SD_ITEM, SD_RESID, EFFECT, N_CONTROLS = 0.1, 0.5, 0.1, 2
GRID = list(itertools.product(("base", "control"), (2, 3, 5), (50, 500), (0.0, 0.03, 0.05, 0.2)))


def simulate(rng, n, seeds, items, sd_seed, reference, effect=0.0, binary=False, rates=(0.1, 0.6)):
    """n studies' (seeds × items) paired differences: condition runs minus the reference arm.

    Condition run s on item i: effect + seed shift a_s + item × condition b_i + noise. Against
    the base model the reference is one run (its own per-item noise repeats in every seed);
    against control it is, per seed, the mean of N_CONTROLS trained runs with their own shifts.
    """
    a = rng.normal(0, sd_seed, (n, seeds, 1))
    b = rng.normal(0, SD_ITEM, (n, 1, items))
    if binary:
        p0 = rng.uniform(*rates, (n, 1, items))
        draw = lambda p, shape: (rng.random(shape) < np.clip(p, 0, 1)).astype(float)  # noqa: E731
        cond = draw(p0 + effect + a + b, (n, seeds, items))
        if reference == "base":
            ref = draw(p0, (n, 1, items))
        else:
            c = rng.normal(0, sd_seed, (n, N_CONTROLS, seeds, 1))
            ref = draw(p0[:, None] + c, (n, N_CONTROLS, seeds, items)).mean(axis=1)
    else:
        cond = effect + a + b + rng.normal(0, SD_RESID, (n, seeds, items))
        if reference == "base":
            ref = rng.normal(0, SD_RESID, (n, 1, items))
        else:
            c = rng.normal(0, sd_seed, (n, N_CONTROLS, seeds, 1))
            ref = (c + rng.normal(0, SD_RESID, (n, N_CONTROLS, seeds, items))).mean(axis=1)
    return cond - ref


def rates(reference, seeds, items, sd_seed, binary=False, n=N_SIM, base_rates=(0.1, 0.6)):
    key = f"{reference}{seeds}{items}{sd_seed}{binary}{base_rates}"
    null = simulate(np.random.default_rng([0, *key.encode()]), n, seeds, items, sd_seed, reference, 0.0, binary,
                    base_rates)
    alt = simulate(np.random.default_rng([1, *key.encode()]), n, seeds, items, sd_seed, reference, EFFECT, binary,
                   base_rates)
    res = (1.0 if reference == "base" else 1.0 / N_CONTROLS) if binary else 0.0  # as analyze passes it
    type1 = np.mean([stats.crossed_test(d, ALPHA, res).p_value <= ALPHA for d in null])
    cover = np.mean([(t := stats.crossed_test(d, ALPHA, res)).ci_lo <= EFFECT <= t.ci_hi for d in alt])
    return float(type1), float(cover)


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    rows = [dict(reference=r, seeds=s, items=i, sd_seed=sd, **dict(zip(("type1", "coverage"), rates(r, s, i, sd))))
            for r, s, i, sd in GRID]
    t = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(f"\ntype-I error (α = {ALPHA}, bound {ALPHA + SLACK:.3f}) and 95% CI coverage, {N_SIM} studies per cell;"
              f" SD item×condition {SD_ITEM}, residual {SD_RESID}, effect {EFFECT}\n"
              + t.pivot_table(index=["reference", "seeds", "items"], columns="sd_seed",
                              values=["type1", "coverage"]).round(3).to_string())
    return t


def test_type1_error_is_at_most_alpha(grid):
    bad = grid[grid["type1"] > ALPHA + SLACK]
    assert bad.empty, bad


def test_coverage_from_three_seeds(grid):
    g = grid[grid["seeds"] >= 3]
    bad = g[(g["coverage"] < 0.92) | (g["coverage"] > 0.98)]
    assert bad.empty, bad


def test_two_seeds_are_conservative(grid):
    """With two runs the seed variance has one df: the test errs on the safe side (type-I ≤ α,
    coverage ≥ 95%), and is more conservative than from three seeds up."""
    g = grid[grid["seeds"] == 2]
    assert (g["coverage"] >= 0.95 - SLACK).all() and (g["type1"] <= ALPHA + SLACK).all()


@pytest.mark.parametrize("reference,seeds", [("base", 2), ("base", 3), ("control", 3), ("control", 5)])
def test_binary_scores(reference, seeds):
    type1, cover = rates(reference, seeds, 200, 0.05, binary=True, n=600)
    assert type1 <= ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / 600)
    assert cover >= 0.92 and (seeds < 3 or cover <= 0.98)


@pytest.mark.parametrize("reference,seeds", [("base", 2), ("control", 2), ("base", 3)])
def test_binary_scores_on_few_items(reference, seeds):
    """10 rare binary events (the demo's size): run means tie often; the resolution floor keeps a
    tie from reading as zero run-to-run variance, so type-I error stays at most α."""
    type1, _ = rates(reference, seeds, 10, 0.0, binary=True, n=600, base_rates=(0.0, 0.15))
    assert type1 <= ALPHA  # without the floor: .072 (base, 2 seeds) and .052 (control, 2 seeds)


def test_effect_size_does_not_drift_with_seeds():
    """d = effect / SD of one (run, item) difference estimates the same number at 2 and 8 seeds
    (d_z of seed-averaged differences grew from .26 to .67 for the same truth)."""
    rng = np.random.default_rng(7)

    def mean_d(seeds):
        ds = []
        for d in simulate(rng, 300, seeds, 100, 0.1, "control", effect=0.2):
            t = stats.crossed_test(d)
            ds.append(t.effect / math.sqrt(t.var_seed + t.var_item + t.var_resid))
        return np.mean(ds)
    assert mean_d(2) == pytest.approx(mean_d(8), rel=0.1)


# ----------------------------------------------------------------------------- whole study tables

def study_tables(rng, values=("a", "b", "c"), seeds=(0, 1, 2), n_items=50, sd_seed=0.05, effects=None,
                 metrics=None):
    """Runs and scores of a synthetic study with run-level (seed) shifts; ``effects[(value, metric)]``."""
    effects = effects or {}
    metrics = metrics or [("values", f"expresses/{v}") for v in values] + [("safety", "refusal")]
    runs = [dict(run_id="base", model="m", condition="base", kind="base", value=None, seed=None)]
    runs += [dict(run_id=f"{c}-s{s}", model="m", condition=c, kind=k, value=v, seed=s)
             for s in seeds for c, k, v in [(f"value-{v}", "value", v) for v in values]
             + [(f"control-{k}", "control", None) for k in range(N_CONTROLS)]]
    runs = pd.DataFrame(runs, columns=list(RUN_COLUMNS))
    parts = []
    for suite, metric in metrics:
        p0 = rng.uniform(0.1, 0.6, n_items) + rng.normal(0, SD_ITEM, n_items)
        for r in runs.itertuples():
            shift = 0.0 if r.kind == "base" else rng.normal(0, sd_seed)
            p = np.clip(p0 + shift + effects.get((r.value, metric), 0.0), 0, 1)
            parts.append(pd.DataFrame(dict(run_id=r.run_id, suite=suite, item_id=[f"i{i}" for i in range(n_items)],
                                           metric=metric, value=(rng.random(n_items) < p).astype(float),
                                           scored=True, judge="j", raw="")))
    return runs, pd.concat(parts, ignore_index=True)[list(SCORE_COLUMNS)]


def test_contrasts_type1_end_to_end():
    """The report's own entry point, on null studies with seed shifts: P(p ≤ α) per contrast."""
    rng = np.random.default_rng(11)
    p = pd.concat([analyze.contrasts(*study_tables(rng))["p_value"] for _ in range(60)])
    assert len(p) == 60 * (3 * 2 + 2) * 4
    assert (p <= ALPHA).mean() <= ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / 60 / 8)


def test_crosstalk_whole_matrix_null_rejects_at_about_alpha():
    rng = np.random.default_rng(12)
    ps = []
    for _ in range(150):
        runs, scores = study_tables(rng, values=("a", "b", "c", "d"), metrics=[("values", f"expresses/{v}")
                                                                                for v in "abcd"])
        ps.append(analyze.crosstalk_tests(analyze.coexpression(analyze.contrasts(runs, scores)))[0]["p_value"])
    rate = np.mean(np.array(ps) <= ALPHA)
    assert 0.01 <= rate <= ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / 150), rate


def test_crosstalk_whole_matrix_detects_a_moved_value():
    runs, scores = study_tables(np.random.default_rng(13), seeds=(0, 1, 2, 3), n_items=300,
                                effects={("a", "expresses/b"): 0.25, ("a", "expresses/a"): 0.3})
    co = analyze.coexpression(analyze.contrasts(runs, scores))
    res = analyze.crosstalk_tests(co)[0]
    assert res["p_value"] < ALPHA and res["n_cells"] == 6


def test_aa_check_familywise_error_with_seed_shifts():
    """Two random arms, 20 metrics, seed shifts: Holm over the contrasts' family keeps P(any
    false positive) ≤ α; uncorrected, most A/A checks would show one."""
    rng = np.random.default_rng(123)
    any_holm = any_raw = 0
    for _ in range(100):
        runs, scores = study_tables(rng, values=(), metrics=[("s", f"m{j}") for j in range(20)], n_items=30)
        res = analyze.aa_check(runs, scores, "control-0", "control-1")
        assert res["n_tests"] == 20
        any_holm += res["any_significant"]
        any_raw += res["n_significant_uncorrected"] > 0
    assert any_holm / 100 <= ALPHA + 0.05  # P(X > 10 | p = .05) ≈ 1%
    assert any_raw / 100 > 0.4


# ----------------------------------------------------------------------------- seed planning

COMPS = dict(var_seed=0.004, var_item=0.01, var_resid=0.25)


def _simulate_components(rng, n, seeds, items):
    return (rng.normal(0, math.sqrt(COMPS["var_seed"]), (n, seeds, 1))
            + rng.normal(0, math.sqrt(COMPS["var_item"]), (n, 1, items))
            + rng.normal(0, math.sqrt(COMPS["var_resid"]), (n, seeds, items)))


def test_planned_seeds_reach_the_promised_halfwidth():
    target = 0.06
    s = stats.seeds_for_halfwidth(**COMPS, n_items=200, target=target)
    assert s is not None and s >= 3
    hw = [(t.ci_hi - t.ci_lo) / 2 for d in _simulate_components(np.random.default_rng(5), 500, s, 200)
          for t in [stats.crossed_test(d)]]
    assert np.median(hw) <= target * 1.05
    hw_less = [(t.ci_hi - t.ci_lo) / 2 for d in _simulate_components(np.random.default_rng(6), 500, s - 1, 200)
               for t in [stats.crossed_test(d)]]
    assert np.median(hw_less) > target * 0.95


def test_planned_seeds_reach_the_promised_power():
    effect = 0.08
    s = stats.seeds_for_power(effect, **COMPS, n_items=200)
    assert s is not None and s >= 3
    hits = [stats.crossed_test(d + effect).p_value < ALPHA
            for d in _simulate_components(np.random.default_rng(8), 600, s, 200)]
    assert np.mean(hits) >= 0.8 - 2.5 * math.sqrt(0.16 / 600)


# ----------------------------------------------------------------------------- effects along training

POINTS = (0.25, 0.5, 1.0)


def progress_tables(rng, slope=0.0, seeds=4, n_items=30, sd_slope=1.0, sd_run=0.02):
    """A study with train.eval_at checkpoints: each training run has its own random slope over
    progress (sd_slope) and shift; the value arm's mean slope is ``slope``, the control's 0."""
    runs = [dict(run_id="base", model="m", condition="base", kind="base", value=None, seed=None, progress=0.0)]
    item = rng.normal(0, SD_ITEM, n_items)
    parts = [("base", 0.0, 0.0, 0.0)]
    for cond, kind, value, mean_slope in [("value-a", "value", "a", slope), ("control-0", "control", None, 0.0)]:
        for s in range(seeds):
            u, v = mean_slope + rng.normal(0, sd_slope), rng.normal(0, sd_run)
            for p in POINTS:
                rid = f"{cond}-s{s}-p{p}"
                runs.append(dict(run_id=rid, model="m", condition=cond, kind=kind, value=value, seed=s, progress=p))
                parts.append((rid, p, u, v))
    scores = pd.concat([pd.DataFrame(dict(
        run_id=rid, suite="safety", item_id=[f"i{i}" for i in range(n_items)], metric="refusal",
        value=item + p * u + v + rng.normal(0, SD_RESID, n_items), scored=True, judge="j", raw=""))
        for rid, p, u, v in parts], ignore_index=True)
    return pd.DataFrame(runs), scores[list(SCORE_COLUMNS)]


def _row(table, **where):
    m = np.ones(len(table), bool)
    for k, v in where.items():
        m &= (table[k] == v).to_numpy()
    return table[m]


def _trend(runs, scores):
    trend = analyze.trend_along_training(runs, scores)
    return _row(trend, condition="value-a", reference="control").iloc[0]


def test_trend_over_training_is_calibrated_with_run_to_run_slopes():
    """The slope's type-I error and CI coverage when every training run has its own slope."""
    rng = np.random.default_rng(21)
    n = 150
    p = [_trend(*progress_tables(rng))["p_value"] for _ in range(n)]
    assert np.mean(np.array(p) <= ALPHA) <= ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / n), np.mean(p)
    hits = []
    for _ in range(n):
        t = _trend(*progress_tables(rng, slope=1.0))
        hits.append(t["ci_lo"] <= 1.0 <= t["ci_hi"])
    assert np.mean(hits) >= 0.93, np.mean(hits)


def test_checkpoints_pooled_as_runs_inflate_type1_error_and_points_do_not():
    """Pseudo-replication, measured: the 3 checkpoints of 4 training runs counted as 12 runs make a
    null effect 'significant' far above alpha; the per-point contrasts (each run once) do not."""
    rng = np.random.default_rng(22)
    n = 100
    pooled, at_end = [], []
    for _ in range(n):
        runs, scores = progress_tables(rng, sd_slope=0.05, sd_run=0.3)
        as_runs = runs.assign(seed=[s if k == "base" else s * 10 + POINTS.index(p)
                                    for s, k, p in zip(runs["seed"], runs["kind"], runs["progress"])])
        pooled.append(_row(analyze.contrasts(as_runs, scores), condition="value-a", reference="control")
                      ["p_value"].iloc[0])
        points = analyze.points_along_training(runs, scores)
        at_end.append(_row(points, condition="value-a", reference="control", progress=1.0)["p_value"].iloc[0])
    slack = 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / n)
    assert np.mean(np.array(at_end) <= ALPHA) <= ALPHA + slack
    assert np.mean(np.array(pooled) <= ALPHA) > 2 * ALPHA


def test_along_training_points_use_each_run_once():
    runs, scores = progress_tables(np.random.default_rng(3), slope=3.0, sd_slope=0.1)
    points, trend = analyze.points_along_training(runs, scores), analyze.trend_along_training(runs, scores)
    row = _row(points, condition="value-a", reference="control")
    assert list(row["progress"]) == list(POINTS) and set(row["n_seeds"]) == {4}
    assert list(trend["points"].unique()) == [3] and set(trend["n_seeds"]) == {4}
    # the final point is the study's end-of-training contrast
    final = analyze.contrasts(runs[(runs["kind"] == "base") | (runs["progress"] == 1.0)], scores)
    end = _row(final, condition="value-a", reference="control")
    assert end["effect"].iloc[0] == pytest.approx(row["effect"].iloc[-1])
    assert _trend(runs, scores)["slope"] > 0 and _trend(runs, scores)["p_value"] < ALPHA


def test_report_draws_effects_along_training(tmp_path):
    from evaluation.assemble import AnalysisSettings, analyze_study
    from evaluation.assemble import build_report_inputs
    from evaluation.report import render
    from evaluation.report_inputs import StudyInfo, StudyTables

    runs, scores = progress_tables(np.random.default_rng(4), slope=3.0, sd_slope=0.1)
    gens = scores[["run_id", "suite", "item_id"]].assign(response="x")
    res = analyze_study(runs, scores, gens, AnalysisSettings())
    assert set(res.contrasts["condition"]) == {"value-a", "control-0"} and set(res.contrasts["n_seeds"]) == {4}
    assert sorted(res.along["progress"].unique()) == list(POINTS)
    final = runs[runs["progress"].isin([0.0, 1.0])]
    html = render(build_report_inputs(final, scores[scores["run_id"].isin(final["run_id"])], res.contrasts,
                                      tables=StudyTables(along=res.along, trend=res.trend)), tmp_path).read_text()
    assert "<th>slope</th>" in html and (tmp_path / "figures" / "along_training_m_safety.png").is_file()
    empty = render(build_report_inputs(final, scores, res.contrasts, StudyInfo(eval_at=(1.0,))),
                   tmp_path / "end-only").read_text()
    assert "Measured at the end of training only" in empty
