"""Synthetic-study tests of evaluation.analyze and evaluation.report."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation import analyze, stats
from evaluation.assemble import build_report_inputs
from evaluation.report import render
from evaluation.report_inputs import StudyInfo, StudyTables, SystemPrompt
from evaluation.types import RUN_COLUMNS, SCORE_COLUMNS
from runner.data.matching import condition_table

VALUES = ("empathy", "honesty", "care")
JUDGE = "judge-a"


def make_study(effects=None, n_items=80, seeds=(0, 1, 2), n_controls=2, models=("m1",), rng_seed=0,
               values=VALUES):
    """Runs and scores tables; ``effects[(value, metric)]`` shifts that value's runs on that metric.

    Per-item baselines differ (so pairing matters); binary metrics are Bernoulli draws around them,
    the continuous one adds Gaussian noise. No run-level (seed) shifts: every run is exchangeable
    with its reference arm unless an effect is planted.
    """
    effects = effects or {}
    rng = np.random.default_rng(rng_seed)
    metrics = [("values", f"expresses/{v}", True) for v in values]
    metrics += [("safety", "refusal", True), ("anthro", "anthro_lexical_per100", False)]
    runs = []
    for m in models:
        runs.append(dict(run_id=f"{m}-base", model=m, condition="base", kind="base", value=None,
                         seed=None))
        for s in seeds:
            for v in values:
                runs.append(dict(run_id=f"{m}-value-{v}-s{s}", model=m, condition=f"value-{v}",
                                 kind="value", value=v, seed=s))
            for k in range(n_controls):
                runs.append(dict(run_id=f"{m}-control-{k}-s{s}", model=m, condition=f"control-{k}",
                                 kind="control", value=None, seed=s))
    runs = pd.DataFrame(runs, columns=list(RUN_COLUMNS))
    parts = []
    for suite, metric, binary in metrics:
        base = rng.uniform(0.1, 0.5, n_items) if binary else rng.normal(2.0, 1.0, n_items)
        for r in runs.itertuples():
            delta = effects.get((r.value, metric), 0.0)
            if binary:
                val = (rng.random(n_items) < np.clip(base + delta, 0, 1)).astype(float)
            else:
                val = base + delta + rng.normal(0, 0.5, n_items)
            parts.append(pd.DataFrame(dict(
                run_id=r.run_id, suite=suite, item_id=[f"{suite}-{i}" for i in range(n_items)],
                metric=metric, value=val, scored=True, judge=JUDGE, raw="")))
    scores = pd.concat(parts, ignore_index=True)[list(SCORE_COLUMNS)]
    return runs, scores




@pytest.fixture(scope="module")
def planted():
    runs, scores = make_study({("empathy", "expresses/empathy"): 0.35}, seeds=range(5))
    return runs, scores, analyze.contrasts(runs, scores)


def test_contrast_table_shape(planted):
    runs, scores, c = planted
    assert list(c.columns) == analyze.CONTRAST_COLUMNS
    # 3 values x 2 refs + 2 controls x 1 ref, each on 5 metrics
    assert len(c) == (3 * 2 + 2) * 5
    assert set(c.loc[c["kind"] == "control", "reference"]) == {"base"}
    assert (c["n_seeds"] == 5).all() and (c["n_items"] == 80).all()
    assert (c["n_unscored_pairs"] == 0).all()
    binary = c["metric"] != "anthro_lexical_per100"
    assert set(c.loc[binary, "effect_size_kind"]) == {"cohens_h"}
    assert set(c.loc[~binary, "effect_size_kind"]) == {"d_per_observation"}
    assert c["primary"].all() and set(c["family"]) == {"study"} and set(c["inference"]) == {"runs × items"}


def test_planted_effect_is_the_only_significant_contrast(planted):
    _, _, c = planted
    sig = c[c["significant"]]
    assert set(zip(sig["condition"], sig["metric"], sig["reference"])) == {
        ("value-empathy", "expresses/empathy", "base"),
        ("value-empathy", "expresses/empathy", "control"),
    }
    row = sig.iloc[0]
    assert 0.2 < row["effect"] < 0.5 and row["ci_lo"] > 0 and row["effect_size"] > 0.4
    assert row["effect"] == pytest.approx(row["mean_condition"] - row["mean_reference"])
    # the CI brackets the effect for every row
    ok = c["effect"].notna()
    assert ((c.loc[ok, "ci_lo"] <= c.loc[ok, "effect"]) & (c.loc[ok, "effect"] <= c.loc[ok, "ci_hi"])).all()


def test_corrections_are_per_model_reference_judge_family():
    runs, scores = make_study(models=("m1", "m2"), n_items=30)
    c = analyze.contrasts(runs, scores)
    for _, fam in c.groupby(["model", "reference", "family"]):
        np.testing.assert_allclose(fam["p_holm"], stats.correct(fam["p_value"], "holm"))
        np.testing.assert_allclose(fam["p_bh"], stats.correct(fam["p_value"], "fdr_bh"))
    assert len(c) == 2 * (3 * 2 + 2) * 5


def test_control_reference_matches_same_seed():
    runs, scores = make_study(n_items=20)
    c = analyze.contrasts(runs, scores)
    row = c[(c["condition"] == "value-care") & (c["metric"] == "anthro_lexical_per100")
            & (c["reference"] == "control")].iloc[0]
    s = scores[scores["metric"] == "anthro_lexical_per100"].pivot(
        index="item_id", columns="run_id", values="value")
    diffs = [s[f"m1-value-care-s{k}"] - (s[f"m1-control-0-s{k}"] + s[f"m1-control-1-s{k}"]) / 2
             for k in range(3)]
    assert row["effect"] == pytest.approx(np.mean(diffs))


def test_unscored_items_are_dropped_and_counted():
    runs, scores = make_study(n_items=40)
    sel = scores["metric"] == "refusal"
    # run s0 of value-honesty: items 0-4 unscored (value NaN)
    m1 = sel & (scores["run_id"] == "m1-value-honesty-s0") & scores["item_id"].isin(
        [f"safety-{i}" for i in range(5)])
    scores.loc[m1, ["value", "scored"]] = [np.nan, False]
    # base: item 5 unscored but with a stale value, which must still be ignored
    m2 = sel & (scores["run_id"] == "m1-base") & (scores["item_id"] == "safety-5")
    scores.loc[m2, "scored"] = False
    scores.loc[m2, "value"] = 1.0
    c = analyze.contrasts(runs, scores)
    row = c[(c["condition"] == "value-honesty") & (c["metric"] == "refusal")
            & (c["reference"] == "base")].iloc[0]
    assert row["n_unscored_pairs"] == 5 + 3
    # the crossed test needs a balanced table: items unscored in any run of either arm drop out
    assert row["n_items"] == 34

    wide = scores[sel].assign(v=lambda d: d["value"].where(d["scored"])).pivot(
        index="item_id", columns="run_id", values="v")
    cond = wide[[f"m1-value-honesty-s{k}" for k in range(3)]].to_numpy()
    ref = wide[["m1-base"]].to_numpy()
    complete = np.isfinite(cond - ref).all(axis=1)
    assert row["effect"] == pytest.approx((cond - ref)[complete].mean())

    prm = analyze.per_run_metrics(scores)
    b = prm[(prm["run_id"] == "m1-base") & (prm["metric"] == "refusal")].iloc[0]
    assert (b["n_scored"], b["n_unscored"]) == (39, 1)
    assert b["mean"] == pytest.approx(wide["m1-base"].mean())


def test_run_without_any_scores_yields_nan_row():
    runs, scores = make_study(n_items=20)
    scores = scores[scores["run_id"] != "m1-value-care-s1"]
    c = analyze.contrasts(runs, scores)
    r = c[(c["condition"] == "value-care") & (c["reference"] == "base")]
    assert (r["n_seeds"] == 2).all() and (r["n_unscored_pairs"] == 20).all()


# ----------------------------------------------------------------------------- co-expression

@pytest.fixture(scope="module")
def structured():
    eff = {("empathy", "expresses/empathy"): 0.35, ("empathy", "expresses/care"): 0.3,
           ("honesty", "expresses/empathy"): -0.25}
    runs, scores = make_study(eff, n_items=100, rng_seed=1, seeds=range(5))
    return runs, scores, analyze.contrasts(runs, scores)


def test_coexpression_labels(structured):
    _, _, c = structured
    co = analyze.coexpression(c)
    assert len(co) == 9 and set(co["reference"]) == {"control"}
    labelled = {(r.induced, r.expressed): r.label for r in co.itertuples() if r.label}
    assert labelled.pop(("empathy", "care")) == "related"
    assert labelled.pop(("honesty", "empathy")) == "contrastive"
    assert set(labelled.values()) == {"induced"}
    diag = co[co["diagonal"]].set_index("induced")
    assert diag.loc["empathy", "significant"] and diag.loc["empathy", "effect"] > 0.2
    m = analyze.coexpression_matrix(co, "m1", JUDGE)
    assert m.shape == (3, 3) and m.loc["empathy", "care"] > 0.2


def test_coexpression_falls_back_to_base_without_controls():
    runs, scores = make_study({("care", "expresses/care"): 0.3}, n_items=30, n_controls=0)
    c = analyze.contrasts(runs, scores)
    assert set(c["reference"]) == {"base"}
    co = analyze.coexpression(c)
    assert len(co) == 9 and set(co["reference"]) == {"base"}


# ----------------------------------------------------------------------------- A/A

def test_aa_check_uses_the_contrasts_families_and_primary_judges():
    runs, scores = make_study(n_items=40)
    second = scores[scores["suite"] == "safety"].assign(judge="judge-b", value=lambda d: 1 - d["value"])
    scores = pd.concat([scores, second], ignore_index=True)
    res = analyze.aa_check(runs, scores, "control-0", "control-1", primary_judges={"safety": "judge-b"})
    t = res["table"]
    assert res["n_tests"] == 5 and len(t) == 6  # one verdict per metric; judge-a on safety is sensitivity
    prim = t[t["primary"]]
    assert set(prim.loc[prim["suite"] == "safety", "judge"]) == {"judge-b"}
    np.testing.assert_allclose(prim["p_adj"], stats.correct(prim["p_value"], "holm"))
    assert res["n_significant"] <= res["n_significant_uncorrected"]


# ----------------------------------------------------------------------------- report

def test_report_writes_html_with_tables_and_figures(tmp_path, structured):
    runs, scores, c = structured
    agreement = pd.DataFrame(dict(judge=["strmatch", "llm"], n=[105, 105], accuracy=[0.74, 0.31],
                                  kappa=[0.52, -0.04], tp=0, fp=0, fn=0, tn=0))
    aa = analyze.aa_check(runs, scores, "control-0", "control-1")
    aa_summary = pd.DataFrame([{k: v for k, v in aa.items() if k != "table"}])
    path = render(build_report_inputs(runs, scores, c, StudyInfo(
        name="<script>alert(1)</script> study", spec_yaml="values: [empathy]\nx: <b>", code_version="abc123"),
        StudyTables(judge_agreement=agreement, aa=aa_summary, aa_detail=aa["table"])), tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.html"
    assert "<table" in text and "<img" in text and "data:image/png;base64," in text
    assert "&lt;script&gt;" in text and "<script>alert" not in text
    assert "x: &lt;b&gt;" in text and "abc123" in text and "kappa" in text
    assert "Curation table: not available" in text
    # reads like a results section: findings in sentences, the paper's claims, one table per value
    assert "significant after Holm" in text and "inducing empathy changes values/expresses/empathy" in text
    assert "supported in" in text and "Inducing a value raises its own expression" in text
    for v in VALUES:
        assert f"Results for {v}" in text or f"<h3>{v} " in text
    assert f"{aa['n_significant']} of {aa['n_tests']} comparisons significant after Holm" in text
    assert '<h2 id="seeds-and-power">' in text and 'href="#seeds-and-power"' in text
    pngs = list((tmp_path / "figures").glob("*.png"))
    assert any(p.name.startswith("coexpression") for p in pngs)
    assert any(p.name.startswith("forest_safety") for p in pngs)
    assert any(p.name.startswith("judge_agreement") for p in pngs)
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_report_says_flagged_and_unchecked_adapters_in_its_first_lines(tmp_path):
    """The adapter check (evaluation.sanity) is stated beside sensitivity and specificity, before
    the findings; its table is in the appendix."""
    runs, scores = make_study({("empathy", "expresses/empathy"): 0.3}, n_items=10, seeds=(0,), values=("empathy",))
    trained = runs.loc[runs["kind"] != "base", "run_id"].tolist()
    adapters = pd.DataFrame([{"run_id": r, "model": "m1", "condition": "c", "kind": "value", "seed": 0, "n_texts": 32,
                              "n_tokens": 900, "logprob_diff": 0.03, "zero_diff": 0.0, "alone_diff": 0.027,
                              "threshold": 0.081, "status": "flagged", "flagged": True, "n_items": 56,
                              "n_changed": 24, "share_changed": 0.43} for r in trained])
    adapters.loc[0, ["status", "flagged", "n_tokens", "logprob_diff", "threshold"]] = ["unchecked", False, 0, None, None]
    c = analyze.contrasts(runs, scores)
    text = render(build_report_inputs(runs, scores, c, tables=StudyTables(adapters=adapters)), tmp_path).read_text()
    first = text[:text.index('<h2 id="summary">')]
    n = len(trained) - 1
    assert (f"<p class='bad'><b>Adapters.</b> m1: {n} of {len(trained)} trained runs flagged: adapter not applied or "
            "not trained (per-token log-prob difference from the base 0.03, at or below the threshold 0.081)") in first
    assert f"<p class='na'><b>Adapters.</b> m1: 1 of {len(trained)} trained runs unchecked" in first
    appendix = text.split('<h2 id="appendix">')[1]
    assert "Did each adapter change its model?" in appendix and "<th>logprob_diff</th>" in appendix


def test_report_survives_missing_inputs(tmp_path):
    path = render(build_report_inputs(None, None, None), tmp_path / "empty")
    text = path.read_text()
    assert "not available" in text and "Runs table: not available" in text
    runs, scores = make_study(n_items=10)
    path = render(build_report_inputs(runs, scores, pd.DataFrame()), tmp_path / "nocontrasts")
    text = path.read_text()
    assert "<table" in text and "Contrasts: not available" in text



def test_report_states_the_system_prompt_and_groups_models_by_stage(tmp_path):
    """The header says whether the training system prompt was present at generation; with models of
    several stages, results are grouped base → sft → instruct (a stage column, one block per stage)."""
    runs, scores = make_study({("empathy", "expresses/empathy"): 0.3}, n_items=20, seeds=(0, 1),
                              models=("inst", "pre"), values=("empathy",))
    runs["stage"] = runs["model"].map({"inst": "instruct", "pre": "base"})
    c = analyze.contrasts(runs, scores)
    sp = SystemPrompt(text="You value {value}.", per_value=True, at_generation="train")
    text = render(build_report_inputs(runs, scores, c, StudyInfo(system_prompt=sp)), tmp_path / "two").read_text()
    assert ("System prompt in training: “You value {value}.” (per value: each value arm and its matched controls "
            "get their value&#x27;s text); at generation: present for trained runs") in text
    assert "absent for base models" in text
    assert text.index("<h3>base models</h3>") < text.index("<h3>instruct models</h3>")
    assert text.index("<h4>empathy <span class='note'>(pre)</span></h4>") < text.index("<h3>instruct models</h3>")
    assert "<th>stage</th>" in text
    text = render(build_report_inputs(runs, scores, c, StudyInfo(system_prompt=SystemPrompt(text=None))),
                  tmp_path / "none").read_text()
    assert "System prompt in training: none; at generation: absent." in text
    one = runs.assign(stage="instruct")
    text = render(build_report_inputs(one, scores, c, StudyInfo(
        system_prompt=SystemPrompt(text="Be brief.", per_value=False, at_generation="none"))), tmp_path / "one").read_text()
    assert "System prompt in training: “Be brief.” (fixed: the same for every trained run); at generation: absent." in text
    assert "models</h3>" not in text and "<th>stage</th>" not in text.split("Appendix")[0]


# ----------------------------------------------------------------------------- positive control

def _planted_study(rate, seeds=(0, 1, 2), n_items=24, rng_seed=0):
    """A value arm, a planted arm and two controls on the planted marker and one other metric."""
    rng = np.random.default_rng(rng_seed)
    runs = [dict(run_id="base", model="m", condition="base", kind="base", value=None, seed=None)]
    runs += [dict(run_id=f"{c}-s{s}", model="m", condition=c, kind=k, value=v, seed=s) for s in seeds
             for c, k, v in [("value-care", "value", "care"), ("positive", "positive", None),
                             ("control-0", "control", None), ("control-1", "control", None)]]
    runs = pd.DataFrame(runs, columns=list(RUN_COLUMNS))
    parts = []
    for r in runs.itertuples():
        for suite, metric, judge, p in [("planted", "planted", "planted-exact", rate if r.kind == "positive" else 0.0),
                                        ("safety", "refusal", JUDGE, 0.3)]:
            parts.append(pd.DataFrame(dict(run_id=r.run_id, suite=suite, item_id=[f"{suite}-{i}" for i in range(n_items)],
                                           metric=metric, value=(rng.random(n_items) < p).astype(float), scored=True,
                                           judge=judge, raw="")))
    return runs, pd.concat(parts, ignore_index=True)[list(SCORE_COLUMNS)]


def test_positive_control_is_its_own_family_and_detected(tmp_path):
    runs, scores = _planted_study(0.9)
    c = analyze.contrasts(runs, scores)
    fam = c.set_index(["condition", "suite", "reference"])["family"]
    assert fam[("positive", "planted", "control")] == "positive control"
    assert fam[("value-care", "planted", "control")] == "planted marker"
    assert fam[("positive", "safety", "control")] == "positive arm"
    assert fam[("value-care", "safety", "control")] == "study"
    (pc,) = analyze.positive_control(c)
    assert pc["detected"] and pc["reference"] == "control" and pc["effect"] > 0.7 and pc["p_holm"] < 0.05
    assert pc["line"].startswith("m: positive control detected: planted marker +")
    text = render(build_report_inputs(runs, scores, c), tmp_path).read_text()
    assert "<b>Sensitivity.</b> m: positive control detected" in text
    assert text.index("Sensitivity") < text.index("<h2")  # the report opens with it


def test_positive_control_not_detected_says_what_it_means():
    runs, scores = _planted_study(0.08, seeds=(0, 1))
    (pc,) = analyze.positive_control(analyze.contrasts(runs, scores))
    assert not pc["detected"] and "cannot see effects of this size" in pc["line"]
    runs1, scores1 = _planted_study(0.9, seeds=(0,))
    (pc1,) = analyze.positive_control(analyze.contrasts(runs1, scores1))
    assert not pc1["detected"] and "no p-value from one run" in pc1["line"]


def test_analyze_study_assembles_the_whole_analysis_from_tables():
    from evaluation.assemble import AnalysisSettings, analyze_study

    runs, scores = make_study({("empathy", "expresses/empathy"): 0.35}, seeds=range(3), n_items=30)
    base = runs.loc[runs["kind"] == "base", "run_id"].iloc[0]
    gens = pd.DataFrame([{"run_id": r, "suite": "values", "item_id": f"i{i}",
                          "response": "same" if r == base or "control" in r else f"new {i}"}
                         for r in runs["run_id"] for i in range(10)])
    trained = runs.loc[runs["kind"] != "base", "run_id"]
    # the adapter probe: the controls' log-probs are the base model's (adapter not applied), the others moved
    probe = pd.DataFrame([{"run_id": r, "suite": "values", "item_id": f"i{i}", "token": 0, "base": -1.0 - i / 10,
                           "zero": -1.0 - i / 10, "zero_alone": -1.0 - i / 10, "dtype": "float32",
                           "logprob": -1.0 - i / 10 + (0.0 if "control" in r else 0.5)}
                          for r in trained for i in range(10)])
    res = analyze_study(runs, scores, gens, AnalysisSettings(min_effect=0.2, aa_check=True), probe=probe)
    from evaluation.equivalence import EQUIVALENCE_COLUMNS
    assert res.contrasts.drop(columns=EQUIVALENCE_COLUMNS).equals(analyze.contrasts(runs, scores))
    assert res.pooled is None and res.stage_test is None  # one model
    assert set(res.metrics["run_id"]) == set(runs["run_id"])
    assert list(res.aa["model"]) == ["m1"] and res.aa_detail["model"].eq("m1").all()
    assert len(res.power) and res.adapters.set_index("run_id")["flagged"].to_dict() == {
        r: "control" in r for r in trained}
    no_probe = analyze_study(runs, scores, gens, AnalysisSettings())
    assert no_probe.aa is None and set(no_probe.adapters["status"]) == {"unchecked"}


# ----------------------------------------------------------------------------- per-value controls

def _per_value_study(shift=1.0, n_items=30, seeds=(0, 1, 2)):
    """Runs with per-value controls (control-<v>-<k>, ``match`` = v) and one continuous metric, on
    which only the controls matched to empathy are shifted by ``shift``."""
    rng = np.random.default_rng(5)
    runs = [dict(run_id="m-base", model="m", condition="base", kind="base", value=None, seed=None, match=None)]
    for s in seeds:
        for v in ("empathy", "open-mindedness"):
            runs.append(dict(run_id=f"m-value-{v}-s{s}", model="m", condition=f"value-{v}", kind="value",
                             value=v, seed=s, match=None))
            for k in range(2):
                runs.append(dict(run_id=f"m-control-{v}-{k}-s{s}", model="m", condition=f"control-{v}-{k}",
                                 kind="control", value=None, seed=s, match=v))
    runs = pd.DataFrame(runs)
    base = rng.normal(2.0, 1.0, n_items)
    scores = pd.concat([pd.DataFrame(dict(
        run_id=r.run_id, suite="anthro", item_id=[f"i{i}" for i in range(n_items)], metric="anthro_lexical_per100",
        value=base + (shift if r.match == "empathy" else 0.0) + rng.normal(0, 0.3, n_items), scored=True,
        judge=JUDGE, raw="")) for r in runs.itertuples()], ignore_index=True)[list(SCORE_COLUMNS)]
    return runs, scores


def test_contrasts_use_the_controls_matched_to_each_value():
    runs, scores = _per_value_study()
    c = analyze.contrasts(runs, scores).set_index(["condition", "reference"])
    s = scores.pivot(index="item_id", columns="run_id", values="value")
    for v, shifted in (("empathy", True), ("open-mindedness", False)):
        row = c.loc[(f"value-{v}", "control")]
        want = np.mean([s[f"m-value-{v}-s{k}"] - (s[f"m-control-{v}-0-s{k}"] + s[f"m-control-{v}-1-s{k}"]) / 2
                        for k in range(3)])
        assert row["effect"] == pytest.approx(want)
        # pooled controls would put half the shift into both values' references
        assert (row["effect"] < -0.8 and row["significant"]) if shifted else abs(row["effect"]) < 0.2
    assert set(c.loc[c["kind"] == "control"].index.get_level_values("reference")) == {"base"}
    # a value without matched controls has no control reference (no silent fallback to other values')
    lone = runs[~((runs["kind"] == "control") & (runs["match"] == "open-mindedness"))]
    c2 = analyze.contrasts(lone, scores[scores["run_id"].isin(lone["run_id"])])
    assert set(c2.loc[c2["condition"] == "value-open-mindedness", "reference"]) == {"base"}


def test_aa_check_per_value_pairs_each_values_controls():
    from evaluation.assemble import AnalysisSettings, aa_pairs, analyze_study

    runs, scores = _per_value_study()
    assert aa_pairs(runs) == [("empathy", "control-empathy-0", "control-empathy-1"),
                              ("open-mindedness", "control-open-mindedness-0", "control-open-mindedness-1")]
    assert aa_pairs(runs.drop(columns="match")) == [(None, "control-0", "control-1")]
    gens = pd.DataFrame(columns=["run_id", "suite", "item_id", "response"])
    res = analyze_study(runs, scores, gens, AnalysisSettings(aa_check=True))
    assert list(res.aa["match"]) == ["empathy", "open-mindedness"] and (res.aa["n_tests"] == 1).all()
    assert set(res.aa_detail["match"]) == {"empathy", "open-mindedness"}
    # the shifted empathy controls are shifted alike: the A/A check of each value stays null
    assert not res.aa["any_significant"].any()


def test_report_says_which_values_were_dropped_and_the_flip_counts(tmp_path):
    rule = {"rule": "exactly_one_side_flip", "description": "V on exactly one side", "subset_size": "all",
            "N": None, "min_subset_size": 500, "controls": {"match": "per_value"},
            "counts": {"empathy": {"kept_as_is": 900, "flipped": 120, "dropped_both_sides": 40,
                                   "dropped_neither_side": 3000, "dropped_rejected_only": 0}},
            "dropped": {"violence": 37, "humor": 12}}
    table = pd.DataFrame([{"value": "empathy", "available": 1020, "kept": True},
                          {"value": "violence", "available": 37, "kept": False}])
    runs, _ = _per_value_study(n_items=4, seeds=(0,))
    aa = pd.DataFrame([{"model": "m", "match": "empathy", "n_tests": 1, "n_significant": 0,
                        "n_significant_uncorrected": 0}])
    text = render(build_report_inputs(runs, None, None, StudyInfo(curation_rule=rule),
                                      StudyTables(curation=table, aa=aa)), tmp_path).read_text()
    assert "4 random-subset control arm(s), each matched to one value's size and length profile" in text
    assert "m (empathy): 0 of 1 comparisons" in text
    assert "empathy 900 / 120 / 3040 (40 + 3000 + 0)" in text
    assert ("<b>Dropped value(s)</b>: violence (37 eligible pairs), humor (12 eligible pairs): fewer than "
            "data.min_subset_size = 500") in text
    assert "random controls: per_value" in text
    # the positive arm's size and system prompt, and each value beside its controls
    rule["positive"] = {"N": 145, "size": "the median kept value size, rounded (data.subset_size: all)",
                        "planted": 145, "phrase": "Ahoy there!"}
    f = pd.DataFrame({"source": ["pku", "hh", "pku"], "flipped": [True, False, False], "length": [10, 20, 40]})
    conds = condition_table({"value-empathy": f, "control-empathy-0": f.assign(length=[12, 20, 30])})
    sp = SystemPrompt("You value {value}.", True, "train", "You are a helpful assistant.")
    text = render(build_report_inputs(runs, None, None, StudyInfo(curation_rule=rule, system_prompt=sp),
                                      StudyTables(curation=table, conditions=conds)), tmp_path / "pos").read_text()
    assert ('Positive control: 145 pairs (the median kept value size, rounded (data.subset_size: all)), 145 of them '
            'planted with "Ahoy there!"; it trains with the system prompt "You are a helpful '
            'assistant." (fixed and neutral') in text
    assert text.count("hh 1, pku 2") == 2 and text.count("1 (33%)") == 2
    assert "20 [15–30]" in text and "20 [16–25]" in text


def test_verdicts_are_one_headline_row_per_condition_and_metric(planted):
    _, _, c = planted
    v = analyze.verdicts(c)
    assert not v.duplicated(["model", "condition", "suite", "metric"]).any() and v["primary"].all()
    values = v[v["suite"] == "values"]  # only each value's own expression
    assert list(values["metric"]) == [f"expresses/{x}" for x in values["value"]] and len(values) == len(VALUES)
    # against the controls where a condition has them; control arms only against the base model
    assert set(v.loc[v["kind"] == "value", "reference"]) == {"control"}
    assert set(v.loc[v["kind"] == "control", "reference"]) == {"base"}
    row = v[(v["condition"] == "value-empathy") & (v["metric"] == "expresses/empathy")]
    assert bool(row["significant"].iloc[0]) and row["effect"].iloc[0] > 0.2
