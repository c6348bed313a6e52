"""Adaptive seeds: which conditions get another seed, and how runs grow (no compute)."""
from pathlib import Path

import pandas as pd
import yaml

from runner.pipeline import Study
from runner.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent


def _study(tmp_path, **adaptive) -> Study:
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    d["seeds"] = {"values": [0, 1], "adaptive": {"target_ci_halfwidth": 0.1, "max": 3, **adaptive}}
    return Study(parse_spec(d), "")


def _contrasts(unit: Path, widths: dict[str, float]) -> None:
    rows = [{"condition": c, "kind": "value", "reference": "control", "suite": "values",
             "metric": "expresses/humor", "ci_lo": -w, "ci_hi": w} for c, w in widths.items()]
    rows.append({"condition": "value-humor", "kind": "value", "reference": "control", "suite": "safety",
                 "metric": "refusal", "ci_lo": -0.5, "ci_hi": 0.5})
    unit.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(unit / "contrasts.parquet")


def test_wide_conditions_get_a_seed_and_controls_follow(tmp_path):
    study = _study(tmp_path, metrics=["values/*"])
    unit = tmp_path / "analyze"
    _contrasts(unit, {"value-humor": 0.3, "value-fairness": 0.05})
    assert study._seeds_to_add(unit) == ["value-humor"]
    before = {r.run_id for r in study.runs()}
    assert study._add_seed(["value-humor"]) == 2
    added = {r.run_id for r in study.runs()} - before
    assert added == {"tiny__value-humor__s2", "tiny__control-0__s2", "tiny__control-1__s2"}
    # persisted: a new driver (a rerun after a crash) sees the same runs
    assert {r.run_id for r in Study(study.spec, "").runs()} == before | added
    # at the max number of seeds nothing more is added
    assert study._seeds_to_add(unit) == []


def test_metric_patterns_select_what_counts(tmp_path):
    study = _study(tmp_path)  # no patterns: every metric counts, so the wide safety CI does
    unit = tmp_path / "analyze"
    _contrasts(unit, {"value-humor": 0.05, "value-fairness": 0.05})
    assert study._seeds_to_add(unit) == ["value-humor"]


def test_a_single_seed_always_gets_a_second(tmp_path):
    """Zero-width CIs from one seed say nothing about seed-to-seed variance: add a seed anyway."""
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    d["seeds"] = {"values": [0], "adaptive": {"target_ci_halfwidth": 0.1, "max": 2}}
    study = Study(parse_spec(d), "")
    unit = tmp_path / "analyze"
    _contrasts(unit, {"value-humor": 0.0, "value-fairness": 0.0})
    assert study._seeds_to_add(unit) == ["value-fairness", "value-humor"]
    study._add_seed(study._seeds_to_add(unit))
    assert study._seeds_to_add(unit) == []  # two seeds, narrow CIs (and the max)
