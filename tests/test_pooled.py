"""Pooling across models (evaluation.pooled), the value × stage test (evaluation.stage_test) and
equivalence (evaluation.equivalence) on small tables."""
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.meta_analysis import combine_effects

from evaluation.equivalence import DEFAULT_MARGINS, margin_for, tost_p, with_equivalence
from evaluation.pooled import ALL_MODELS, pool_contrasts, random_effects
from evaluation.stage_test import stage_line, stage_test
from runner.context import study_runs
from runner.spec import SpecError, parse_spec
from runner.stages.analyze_mlflow import _log_verdicts
from runner.tracking import Tracker


def test_random_effects_matches_statsmodels_dl_hksj():
    y, se = np.array([0.1, 0.5, 0.25, -0.1, 0.3]), np.array([0.08, 0.1, 0.05, 0.12, 0.07])
    sm = combine_effects(y, se**2, method_re="dl")
    assert sm.tau2 > 0  # heterogeneous: statsmodels does not truncate a negative DL τ² at 0, we do
    r = random_effects(y, se, floor_scale=False)
    assert r.tau2 == pytest.approx(sm.tau2) and r.i2 == pytest.approx(sm.i2)
    assert r.effect == pytest.approx(sm.mean_effect_re)
    assert r.se == pytest.approx(sm.sd_eff_w_re_hksj)
    lo, hi = sm.conf_int(use_t=True)[3]  # "random effect wls": HKSJ with t on k − 1 df
    assert (r.ci_lo, r.ci_hi) == (pytest.approx(lo), pytest.approx(hi))
    assert r.p_value == pytest.approx(2 * sps.t.sf(abs(r.effect / r.se), 4))


def test_the_scale_floor_and_the_shared_item_term_only_widen():
    y, se = np.array([0.20, 0.21, 0.19]), np.array([0.1, 0.1, 0.1])  # agree better than their SEs say
    plain, floored = random_effects(y, se, floor_scale=False), random_effects(y, se)
    assert plain.hksj_scale < 1 and floored.se == pytest.approx(0.1 / np.sqrt(3)) and floored.se > plain.se
    shared = random_effects(y, se, shared_item=[0.003] * 3)
    # equal weights: the item term counted once in full rather than a third of it
    assert shared.se**2 == pytest.approx(floored.se**2 + 0.003 * (1 - 1 / 3))
    with pytest.raises(ValueError, match="k ≥ 2"):
        random_effects([0.1], [0.1])


def _con(model, value, metric, effect, se=0.05, p=0.01, suite="values", reference="control", primary=True):
    return dict(model=model, condition=f"value-{value}", kind="value", value=value, suite=suite, metric=metric,
                judge="j", primary=primary, reference=reference, family="study", effect=effect, se=se, df=4.0,
                p_value=p, var_item=0.01, n_items=50)


def test_pool_contrasts_pools_models_and_families_and_skips_single_runs():
    rows = [_con(m, "empathy", "expresses/empathy", e) for m, e in [("a", .3), ("b", .2), ("c", .25), ("d", .1)]]
    rows += [_con("a", "humor", "expresses/humor", 0.1), _con("b", "humor", "expresses/humor", 0.1, p=np.nan)]
    rows += [_con("a", "empathy", "expresses/empathy", 9.0, primary=False)]  # another judge: not pooled
    t = pool_contrasts(pd.DataFrame(rows), families={"a": "llama-3", "b": "llama-3", "c": "qwen", "d": None})
    assert set(zip(t["pool"], t["value"], t["k_models"])) == {(ALL_MODELS, "empathy", 4), ("llama-3", "empathy", 2)}
    every = t[t["pool"] == ALL_MODELS].iloc[0]
    assert every["effect"] == pytest.approx(random_effects([.3, .2, .25, .1], [.05] * 4, [0.01 / 50] * 4).effect)
    assert every["models"] == "a, b, c, d" and every["significant"] == (every["p_holm"] < 0.05)
    assert pool_contrasts(pd.DataFrame(rows[:1])).empty


def test_stage_test_compares_pooled_instruct_with_the_others():
    rows = [_con(m, "empathy", "expresses/empathy", e) for m, e in [("i1", .5), ("i2", .45), ("b1", .1)]]
    rows += [_con(m, "humor", "expresses/humor", .2) for m in ("i1", "b1")]
    stages = {"i1": "instruct", "i2": "instruct", "b1": "base"}
    t = stage_test(pd.DataFrame(rows), stages).set_index("value")
    emp = t.loc["empathy"]
    pooled = random_effects([.5, .45], [.05, .05], [0.01 / 50] * 2)
    assert (emp["k_instruct"], emp["k_other"]) == (2, 1)
    assert emp["difference"] == pytest.approx(pooled.effect - 0.1)
    assert emp["se"] == pytest.approx(np.hypot(pooled.se, 0.05))
    assert t.loc["humor", "difference"] == pytest.approx(0) and not t.loc["humor", "significant"]
    assert stage_line(t.reset_index(), "control").startswith("own expression larger in instruct models for")
    assert stage_test(pd.DataFrame(rows), {m: "instruct" for m in stages}).empty
    assert stage_line(None, "control").startswith("not measured")


def test_tost_is_the_1_minus_2alpha_ci_inside_the_margin():
    rng = np.random.default_rng(3)
    effect, se, df = rng.normal(0, .05, 500), rng.uniform(.005, .05, 500), rng.uniform(1, 60, 500)
    p = tost_p(effect, se, df, np.full(500, 0.05))
    q = sps.t.ppf(0.95, df)
    inside = (effect - q * se > -0.05) & (effect + q * se < 0.05)
    assert ((p < 0.05) == inside).all() and inside.any() and (~inside).any()
    # no variation at all (every paired difference 0, as when every run misses every QA item): no
    # evidence of equivalence, inside the margin or not
    assert list(tost_p([0.0, 0.07], [0.0, 0.0], [np.inf, np.inf], [0.05, 0.05])) == [1.0, 1.0]
    assert np.isnan(tost_p([0.0], [np.nan], [3.0], [0.05])).all()


def test_with_equivalence_verdicts_and_default_margin():
    assert margin_for("qa", "acc", DEFAULT_MARGINS) == 0.05 and np.isnan(margin_for("qa", "f1", DEFAULT_MARGINS))
    rows = pd.DataFrame([dict(suite="qa", metric="acc", effect=0.0, se=0.01, df=10, p_value=0.9, significant=False),
                         dict(suite="qa", metric="acc", effect=0.0, se=0.1, df=10, p_value=0.9, significant=False),
                         dict(suite="qa", metric="acc", effect=0.2, se=0.01, df=10, p_value=1e-6, significant=True),
                         dict(suite="qa", metric="acc", effect=0.0, se=0.01, df=10, p_value=np.nan,
                              significant=False),   # one run: not tested
                         dict(suite="safety", metric="refusal", effect=0.0, se=0.01, df=10, p_value=0.9,
                              significant=False)])  # no margin for it
    t = with_equivalence(rows)
    assert list(t["equivalence"]) == ["equivalent within ±0.05", "not shown equivalent", "changed", "", ""]
    t = with_equivalence(rows, {"safety/*": 0.1})
    assert list(t["equivalence"]) == ["", "", "", "", "equivalent within ±0.1"]


def test_mlflow_parent_gets_the_pooled_and_stage_tables(tmp_path):
    """A real MLflow store (sqlite): the parent run holds the across-models counts and tables."""
    import mlflow  # deferred: seconds to import
    from mlflow.tracking import MlflowClient  # deferred: mlflow

    rows = [_con(m, "empathy", "expresses/empathy", e) for m, e in [("a", .3), ("b", .2), ("c", .25)]]
    con = pd.DataFrame(rows).assign(p_holm=0.01, p_bh=0.01, significant=True, ci_lo=0.1, ci_hi=0.4)
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / "report.html").write_text("<html></html>")
    pool = pool_contrasts(con)
    pool.to_parquet(unit / "pooled.parquet")
    stage_test(con, {"a": "instruct", "b": "instruct", "c": "base"}).to_parquet(unit / "stage_test.parquet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "exp", "study", tmp_path)
    parent = tr.parent()
    ctx = SimpleNamespace(spec=SimpleNamespace(analyze=SimpleNamespace(alpha=0.05)))
    _log_verdicts(ctx, tr, parent, unit, con, con.head(0))
    metrics = MlflowClient(uri).get_run(parent).data.metrics
    assert metrics["pooled/tests"] == 1 and metrics["pooled/significant_holm"] == int(pool["significant"].sum())
    assert metrics["stage_test/tests"] == 1
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    # load_table goes through the fluent API's URI: set it for this check only (as test_rehearsal does)
    previous = mlflow.get_tracking_uri() if "MLFLOW_TRACKING_URI" in os.environ else None
    mlflow.set_tracking_uri(uri)
    try:
        back = client.load_table(exp.experiment_id, "verdicts/pooled.json", run_ids=[parent])
    finally:
        mlflow.set_tracking_uri(previous)
    assert list(back["k_models"]) == [3]


def test_spec_family_reaches_the_runs_and_margins_are_checked():
    d = yaml.safe_load((Path(__file__).resolve().parent.parent / "jobs" / "smoke.yaml").read_text())
    spec = parse_spec(d)
    assert spec.analyze.equivalence_margin == DEFAULT_MARGINS  # reason stated in evaluation.equivalence
    d["models"][0]["family"] = "smollm2"
    runs = study_runs(parse_spec(d), ["control-0"], lambda c: [0])
    assert {r.family for r in runs if r.model == d["models"][0]["name"]} == {"smollm2"}
    d["analyze"] = {**(d.get("analyze") or {}), "equivalence_margin": {"qa/acc": 0}}
    with pytest.raises(SpecError) as e:
        parse_spec(d, "x.yaml")
    assert any("equivalence_margin" in path and "> 0" in msg for path, msg in e.value.problems)
