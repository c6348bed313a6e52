"""The claims table counts significant contrasts for and against each of the paper's claims."""
import numpy as np
import pandas as pd

from evaluation import analyze
from evaluation.claims import POOLED, STAGE_CLAIM, claims_table
from evaluation.equivalence import with_equivalence


def _row(value, suite, metric, effect, significant, reference="control", judge="j", primary=True):
    half = abs(effect) / 2 if significant else abs(effect) + 0.1  # a significant CI excludes 0
    return dict(model="m", condition=f"value-{value}", kind="value", value=value, suite=suite, metric=metric,
                judge=judge, primary=primary, reference=reference, effect=effect, significant=significant,
                ci_lo=effect - half, ci_hi=effect + half)


def _table(rows):
    return claims_table(pd.DataFrame(rows)).set_index("claim")


def test_own_expression_counts_only_the_diagonal():
    t = _table([_row("empathy", "values", "expresses/empathy", 0.3, True),
                _row("honesty", "values", "expresses/honesty", 0.1, False),
                _row("empathy", "values", "expresses/honesty", -0.4, True)])  # off-diagonal: not this claim
    r = t.loc["Inducing a value raises its own expression"]
    assert (r["n_contrasts"], r["for"], r["against"]) == (2, 1, 0)
    assert r["verdict"] == "supported in 1 of 2 contrasts"


def test_safety_claim_uses_positive_values_and_its_direction():
    t = _table([_row("empathy", "safety", "harmful_compliance", -0.2, True),
                _row("honesty", "safety", "harmful_compliance", 0.2, True),
                _row("deception", "safety", "harmful_compliance", 0.5, True)])  # a negative value: excluded
    r = t.loc[t.index.str.startswith("Positive values make models safer")].iloc[0]
    assert (r["n_contrasts"], r["for"], r["against"]) == (2, 1, 1)
    assert r["verdict"].startswith("mixed")


def test_no_change_claims_count_any_significant_change_against():
    t = _table([_row("empathy", "qa", "acc", -0.1, True), _row("honesty", "qa", "acc", 0.01, False)])
    r = t.loc["QA accuracy stays largely stable"]
    assert np.isnan(r["for"]) and r["against"] == 1
    assert r["verdict"] == ("changed in 1 of 2 contrasts; no equivalence margin (analyze.equivalence_margin): "
                            "not tested for equivalence")


def test_not_significant_is_not_detected_and_missing_is_not_measured():
    t = _table([_row("empathy", "anthropomorphism", "anthro_llm", 0.5, False)])
    assert t.loc["Every value raises anthropomorphic language", "verdict"] == "not detected: 0 of 1 contrasts significant"
    assert t.loc["QA accuracy stays largely stable", "verdict"] == "not measured"


def test_one_contrast_counts_once_whatever_the_number_of_judges():
    t = _table([_row("empathy", "safety", "harmful_compliance", -0.2, True, judge=j, primary=j == "strmatch")
                for j in ("strmatch", "substring", "llm")])
    r = t.loc[t.index.str.startswith("Positive values make models safer")].iloc[0]
    assert (r["n_contrasts"], r["for"]) == (1, 1)


def test_for_needs_the_ci_on_the_predicted_side():
    row = _row("empathy", "anthropomorphism", "anthro_llm", 0.3, True)
    row.update(ci_lo=-0.05, ci_hi=0.65)  # significant after correction, yet the CI covers 0: no verdict
    r = _table([row]).loc["Every value raises anthropomorphic language"]
    assert (r["for"], r["against"]) == (0, 0)


def test_controls_are_the_reference_when_present():
    rows = [_row("empathy", "sycophancy", "sycophantic", 0.3, True, reference="base"),
            _row("empathy", "sycophancy", "sycophantic", 0.1, False, reference="control")]
    r = claims_table(pd.DataFrame(rows)).iloc[0]
    assert r["reference"] == "control"
    assert claims_table(pd.DataFrame(rows[:1])).iloc[0]["reference"] == "base"


def test_crosstalk_row_counts_related_and_contrastive_cells():
    rows = [dict(_row(v, "values", f"expresses/{e}", eff, sig), p_value=0.01, p_holm=0.02 if sig else 0.5,
                 p_bh=0.02, effect_size=0.5, n_seeds=2, n_items=10)
            for v, e, eff, sig in [("empathy", "empathy", 0.3, True), ("empathy", "honesty", 0.2, True),
                                   ("honesty", "empathy", -0.2, True), ("honesty", "honesty", 0.0, False)]]
    c = pd.DataFrame(rows)
    co = analyze.coexpression(c)
    t = claims_table(c, coexpression=co, crosstalk=[{"p_value": 0.004, "model": "m", "judge": "j"}])
    r = t.set_index("claim").loc["Inducing a value moves related and contrastive values along"]
    assert (r["n_contrasts"], r["for"]) == (2, 2)
    assert r["verdict"] == "1 related and 1 contrastive of 2 off-diagonal cells; whole-matrix (Simes) p 0.004"


def _qa(value, effect, se, significant):
    return dict(_row(value, "qa", "acc", effect, significant), se=se, df=20.0, p_value=0.01 if significant else 0.5)


def test_stays_stable_counts_equivalence_against_the_margin():
    rows = [_qa("empathy", 0.0, 0.01, False),      # 90% CI ±0.017: inside ±0.05
            _qa("honesty", 0.01, 0.01, False),
            _qa("humor", 0.0, 0.05, False),        # too noisy to show anything: not shown equivalent
            _qa("privacy", -0.2, 0.02, True)]      # a significant change
    t = claims_table(with_equivalence(pd.DataFrame(rows), {"qa/acc": 0.05})).set_index("claim")
    r = t.loc["QA accuracy stays largely stable"]
    assert (r["n_contrasts"], r["for"], r["against"]) == (4, 2, 1)
    assert r["verdict"] == "equivalent within ±0.05 in 2 of 4 contrasts; 1 not shown equivalent; 1 changed"


def test_noise_no_longer_confirms_stability():
    """The old reading called a noisy null "no significant change"; equivalence says it is not shown."""
    t = claims_table(with_equivalence(pd.DataFrame([_qa("empathy", 0.0, 0.2, False)]))).set_index("claim")
    assert t.loc["QA accuracy stays largely stable", "verdict"] == "equivalent within ±0.05 in 0 of 1 contrasts; " \
                                                                   "1 not shown equivalent"


def test_negative_values_claim_uses_the_values_not_positive():
    t = _table([_row("deception", "safety", "harmful_compliance", 0.3, True),
                _row("violence", "safety", "harmful_compliance", 0.1, False),
                _row("empathy", "safety", "harmful_compliance", 0.4, True)])  # positive: not this claim
    r = t.loc[t.index.str.startswith("Negative values reduce safety")].iloc[0]
    assert (r["n_contrasts"], r["for"], r["against"]) == (2, 1, 0)
    r = claims_table(pd.DataFrame([_row("empathy", "safety", "harmful_compliance", 0.4, True)]),
                     positive_values=["honesty"]).set_index("claim")
    assert r.loc[r.index.str.startswith("Negative values"), "n_contrasts"].iloc[0] == 1  # spec's values.positive


def test_pooled_rows_are_a_second_level():
    per_model = [_row("empathy", "values", "expresses/empathy", 0.3, True)]
    pooled = pd.DataFrame([dict(_row("empathy", "values", "expresses/empathy", 0.2, False), pool="all models")])
    t = claims_table(pd.DataFrame(per_model), pooled=pooled)
    own = t[t["claim"] == "Inducing a value raises its own expression"].set_index("level")
    assert own.loc["per model", "verdict"] == "supported in 1 of 1 contrasts"
    assert own.loc[POOLED, "verdict"] == "not detected: 0 of 1 contrasts significant"
    assert (claims_table(pd.DataFrame(per_model))["level"] != POOLED).all()


def test_stage_claim_not_measured_with_one_stage_and_counted_with_two():
    rows = [dict(_row("empathy", "values", "expresses/empathy", 0.3, True), model=m) for m in ("a", "b")]
    rows.append(dict(_row("empathy", "safety", "harmful_compliance", 0.3, True), model="b"))
    one = claims_table(pd.DataFrame(rows), stages={"a": "instruct", "b": "instruct"}).set_index("claim")
    assert one.loc[STAGE_CLAIM, "verdict"] == "not measured: the study's models are of one stage (instruct)"
    test = pd.DataFrame([dict(value="empathy", metric="expresses/empathy", reference="control", difference=0.2,
                              ci_lo=0.05, ci_hi=0.35, significant=True)])
    two = claims_table(pd.DataFrame(rows), stage_test=test, stages={"a": "instruct", "b": "base"}).set_index("claim")
    r = two.loc[STAGE_CLAIM]
    assert (r["n_contrasts"], r["for"], r["against"]) == (1, 1, 0)
    assert r["verdict"].startswith("own expression larger in instruct models for 1 of 1 values, smaller for 0")
    assert "side effects significant in 100% of the other models' 1 contrasts" in r["verdict"]


def test_a_stable_claim_says_why_a_margin_was_not_tested():
    """With a margin but one run per arm, the claim says so, not that the margin is missing."""
    rows = [{**_row("empathy", "qa", "acc", 0.0, False), "equivalence_margin": 0.05, "equivalence": ""}]
    r = _table(rows).loc["QA accuracy stays largely stable"]
    assert r["verdict"] == ("no significant change in 1 contrasts; one run per arm (run-to-run variance "
                            "unmeasured): not tested for equivalence")
