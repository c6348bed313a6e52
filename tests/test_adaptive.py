"""Adaptive seeds: the pure decision (evaluation.adaptive) and how runs grow (no compute)."""
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from evaluation.adaptive import decide, snapshot
from runner.pipeline import Study
from runner.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent


def _row(cond, half, metric="expresses/humor", suite="values", kind="value", significant=False, effect=0.0,
         var_item=0.0, n_items=100, n_seeds=2, reference="control", primary=True):
    return dict(condition=cond, kind=kind, reference=reference, suite=suite, metric=metric, judge="j",
                primary=primary, ci_lo=effect - half, ci_hi=effect + half, significant=significant, effect=effect,
                n_seeds=n_seeds, n_items=n_items, var_item=var_item, p_value=0.5, p_holm=1.0)


def test_wide_conditions_get_a_seed():
    c = pd.DataFrame([_row("value-humor", 0.3), _row("value-fairness", 0.05),
                      _row("value-humor", 0.5, suite="safety", metric="refusal")])
    d = decide(c, {"value-humor": 2, "value-fairness": 2}, max_seeds=3, target=0.1, metrics=["values/*"])
    assert d.add == ["value-humor"] and d.reasons["value-fairness"] == "target reached"
    # without patterns every metric counts, and only primary rows of value/positive arms
    c.loc[len(c)] = _row("value-fairness", 0.9, primary=False)
    c.loc[len(c)] = _row("control-0", 0.9, kind="control")
    assert decide(c, {"value-humor": 2, "value-fairness": 2}, 3, target=0.1).add == ["value-humor"]
    assert decide(c, {"value-humor": 3, "value-fairness": 2}, 3, target=0.1).reasons["value-humor"].startswith("at the max")


def test_a_single_seed_always_gets_a_second():
    """Zero-width CIs from one seed say nothing about seed-to-seed variance: add a seed anyway."""
    c = pd.DataFrame([_row("value-humor", 0.0, n_seeds=1), _row("value-fairness", 0.0, n_seeds=1)])
    d = decide(c, {"value-humor": 1, "value-fairness": 1}, max_seeds=2, target=0.1)
    assert d.add == ["value-fairness", "value-humor"]


def test_more_items_not_more_seeds():
    """The item × condition floor z·sqrt(var_item / n_items) is above the target: stop and say so."""
    c = pd.DataFrame([_row("value-humor", 0.08, var_item=0.09, n_items=100)])  # floor ±.059
    d = decide(c, {"value-humor": 2}, max_seeds=10, target=0.043)
    assert d.add == [] and d.more_items == ["value-humor"]
    assert decide(c, {"value-humor": 2}, max_seeds=10, target=0.07).add == ["value-humor"]


def test_until_significant_watches_the_positive_arm_too():
    c = pd.DataFrame([_row("positive", 0.2, suite="planted", metric="planted", kind="positive", effect=0.15),
                      _row("value-humor", 0.05, significant=True, effect=0.2)])
    d = decide(c, {"positive": 2, "value-humor": 2}, max_seeds=6, until="significant")
    assert d.add == ["positive"] and d.reasons["value-humor"] == "significant"
    # an effect smaller than the item floor cannot become significant with more seeds
    c.loc[0, ["var_item", "n_items"]] = [0.5, 20]
    assert decide(c, {"positive": 2, "value-humor": 2}, 6, until="significant").more_items == ["positive"]
    assert decide(c, {"positive": 2, "value-humor": 2}, 6, until="significant", conditions=["value-*"]).add == []
    rows = snapshot(c, d)
    assert {r["condition"]: r["decision"] for r in rows} == {"positive": "add a seed", "value-humor": "significant"}
    assert np.isclose(rows[0]["ci_halfwidth"], 0.2)


def test_added_seeds_follow_to_the_controls_and_persist(tmp_path):
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    d["seeds"] = {"values": [0, 1], "adaptive": {"target_ci_halfwidth": 0.1, "max": 3}}
    study = Study(parse_spec(d), "")
    before = {r.run_id for r in study.runs()}
    assert study.seeds.add(["value-humor"]) == 2
    added = {r.run_id for r in study.runs()} - before
    assert added == {"tiny__value-humor__s2", "tiny__control-0__s2", "tiny__control-1__s2"}
    # persisted: a new driver (a rerun after a crash) sees the same runs
    assert {r.run_id for r in Study(study.spec, "").runs()} == before | added
