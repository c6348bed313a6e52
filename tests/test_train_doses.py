"""Doses and the prompt-only arm on plain objects: the step schedule (train.steps_per_condition),
train.eval_at_steps, the runs a spec lists with controls.prompt_only, their keys and system prompts,
and the contrasts, along-training points and report tables they give on small hand-built tables."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from evaluation.along import points_along_training, trend_along_training
from evaluation.contrasts import contrasts, references, verdicts
from evaluation.report.doses import dose_table, prompting_table
from runner.context import Run, study_runs
from runner.plan import estimate
from runner.spec import SpecError, parse_spec
from runner.stages.generate import system_prompt
from runner.stages.train import _cell_train, _train_section
from runner.train.doses import DoseError, condition_steps, epochs_of, schedule, step_fractions
from runner.train.loop import progress_steps


def _spec(train=None, controls=None, **extra):
    return parse_spec({
        "study": {"name": "d"},
        "models": [{"name": "m", "path": "org/Model-1B"}],
        "values": {"induced": ["humor", "fairness"]},
        "controls": {"count": 1, "match": "per_value", **(controls or {})},
        "seeds": {"values": [0, 1]},
        "data": {"sources": [{"name": "ultrafeedback", "max_pairs": 1000}], "subset_size": 100},
        "annotate": {"judge_model": "org/Judge-1B"},
        "train": {"batch_size": 8, "system_prompt": "You value {value}.", **(train or {})},
        **extra,
    })


# ----------------------------------------------------------------------------- the step schedule

def _old_schedule(n, batch, epochs, seed):  # the schedule before train.steps_per_condition
    steps = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(n).tolist()
        steps += [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return steps


def test_per_subset_schedule_is_the_one_trained_before():
    for n, epochs in [(20, 1), (60, 3), (8, 2), (7, 1)]:
        assert schedule(n, 8, epochs, 5) == _old_schedule(n, 8, epochs, 5)
        assert schedule(n, 8, epochs, 5, total=epochs * (n // 8)) == _old_schedule(n, 8, epochs, 5)


def test_equal_steps_repeat_a_small_subset_reshuffled_each_epoch():
    train = _spec({"steps_per_condition": "equal", "epochs": 2}).train
    sizes = {"value-humor": 20, "value-fairness": 60, "control-0": 60}
    assert condition_steps(sizes, _spec({"epochs": 2}).train) == {"value-humor": 4, "value-fairness": 14,
                                                                  "control-0": 14}
    steps = condition_steps(sizes, train)
    assert steps == dict.fromkeys(sizes, 14)  # the largest condition's epochs × steps per epoch
    s = schedule(20, 8, 2, 0, total=steps["value-humor"])
    assert len(s) == 14 and all(len(b) == 8 and len(set(b)) == 8 for b in s)
    epochs = [s[i:i + 2] for i in range(0, 14, 2)]  # 2 whole batches per 20-pair epoch
    assert all(set(sum(e, [])) <= set(range(20)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert s[:2] == _old_schedule(20, 8, 1, 0)  # its first epoch is the per-subset one
    assert epochs_of(14, 20, 8) == 7.0 and epochs_of(14, 60, 8) == 2.0
    # the last epoch may be partial: 5 steps of a 2-step epoch
    assert len(schedule(20, 8, 1, 0, total=5)) == 5 and epochs_of(5, 20, 8) == 2.5


def test_a_subset_smaller_than_a_batch_is_refused():
    with pytest.raises(DoseError, match="value-humor: fewer pairs than train.batch_size"):
        condition_steps({"value-humor": 5, "value-fairness": 60}, _spec({"steps_per_condition": "equal"}).train)


# ----------------------------------------------------------------------------- train.eval_at_steps

@pytest.mark.parametrize("train, message", [
    ({"eval_at_steps": [5], "eval_at": [0.5, 1.0]}, "train.eval_at_steps and train.eval_at"),
    ({"eval_at_steps": [0, 5]}, "at least 1"),
    ({"eval_at_steps": [5, 5]}, "unique"),
])
def test_eval_at_steps_is_validated(train, message):
    with pytest.raises(SpecError) as e:
        _spec(train)
    assert "train.eval_at_steps" in str(e.value) and message in str(e.value)


def test_eval_at_steps_become_fractions_that_the_workers_save_at_those_steps():
    train = _spec({"eval_at_steps": [10, 3]}).train
    assert train.eval_at_steps == [3, 10] and train.eval_at == [1.0]
    for total in (11, 14, 137):
        fractions = step_fractions(train, total, "value-humor")
        assert sorted(progress_steps(fractions, total)) == [3, 10]  # runner.train.loop saves there
    with pytest.raises(DoseError, match=r"train.eval_at_steps: step\(s\) \[10\] not below the 10 optimizer steps "
                                        "of value-humor"):
        step_fractions(train, 10, "value-humor")
    assert step_fractions(_spec({"eval_at": [0.5, 1.0]}).train, 10, "x") == [0.5, 1.0]


def test_runs_carry_steps_and_the_cell_its_own_points():
    spec = _spec({"eval_at_steps": [2], "steps_per_condition": "equal"})
    sizes = {"value-humor": 20, "value-fairness": 60, "control-humor-0": 20, "control-fairness-0": 60}
    steps = condition_steps(sizes, spec.train)
    runs = study_runs(spec, spec.conditions(), lambda c: [0], doses=lambda c: (steps[c], sizes[c]))
    by_id = {r.run_id: r for r in runs}
    humor, point = by_id["m__value-humor__s0"], by_id["m__value-humor__s0__step2"]
    assert (humor.step, humor.epochs, humor.final) == (7, 3.5, True)
    assert (point.step, point.progress, point.final) == (2, 2 / 7, False)
    assert by_id["m__value-fairness__s0"].epochs == 1.0
    cell = _cell_train(spec.train, humor)
    assert cell.eval_at == [2 / 7, 1.0] and f"{point.progress:g}" == f"{cell.eval_at[0]:g}"  # adapter_path's dir
    # without the sizes (before curation, `valind plan`): the same run ids, shares not known yet
    early = study_runs(spec, spec.conditions(), lambda c: [0])
    assert [r.run_id for r in early] == [r.run_id for r in runs]
    assert np.isnan(next(r.progress for r in early if r.run_id.endswith("__step2")))


def test_the_train_key_holds_the_dose_settings_only_when_set():
    def section(**train):
        return _train_section(SimpleNamespace(spec=_spec(train)), None)
    assert "steps_per_condition" not in section() and "eval_at_steps" not in section()  # old keys stand
    assert section(steps_per_condition="equal")["steps_per_condition"] == "equal"
    assert section(eval_at_steps=[3])["eval_at_steps"] == [3]
    assert section() != section(steps_per_condition="equal")  # a changed dose never resumes the other's state


# ----------------------------------------------------------------------------- the prompt-only arm

def test_prompt_only_lists_one_untrained_run_per_model_and_value():
    spec = _spec(controls={"prompt_only": True})
    runs = study_runs(spec, spec.conditions(), lambda c: [0, 1])
    prompt = [r for r in runs if r.kind == "prompt"]
    assert [(r.run_id, r.condition, r.value, r.seed, r.cell_key, r.final) for r in prompt] == [
        ("m__prompt-humor", "prompt-humor", "humor", None, None, True),
        ("m__prompt-fairness", "prompt-fairness", "fairness", None, None, True)]
    assert len(runs) == 1 + 2 + 4 * 2  # base, prompts, (2 values + 2 controls) × 2 seeds
    # under data.subset_size: all only the kept values get one
    assert [r.value for r in study_runs(spec, spec.conditions(["humor"]), lambda c: [0], values=["humor"])
            if r.kind == "prompt"] == ["humor"]
    ctx = SimpleNamespace(spec=spec)
    assert system_prompt(ctx, prompt[0]) == "You value humor."  # whatever generate.system_prompt says
    assert system_prompt(ctx, runs[0]) is None
    assert estimate(spec).counts["evaluated runs"] == len(runs)


def test_prompt_only_needs_a_training_system_prompt():
    with pytest.raises(SpecError) as e:
        _spec({"system_prompt": None}, {"prompt_only": True})
    assert "controls.prompt_only" in str(e.value) and "train.system_prompt" in str(e.value)


def _table(effects: dict[str, float], n_items=40, seeds=(0, 1, 2), rng_seed=1, with_control=True):
    """runs and scores of one model: base, prompt-humor, value-humor and control-0, item scores
    = item effect + the run's condition effect + noise."""
    rng = np.random.default_rng(rng_seed)
    rows = [("m__base", "base", "base", None, None), ("m__prompt-humor", "prompt-humor", "prompt", "humor", None)]
    conds = [("value-humor", "value", "humor")] + ([("control-0", "control", None)] if with_control else [])
    rows += [(f"m__{c}__s{s}", c, k, v, s) for c, k, v in conds for s in seeds]
    runs = pd.DataFrame(rows, columns=["run_id", "condition", "kind", "value", "seed"]).assign(model="m")
    item = rng.normal(0, 1, n_items)
    scores = [dict(run_id=r.run_id, suite="s", metric="x", judge="j", item_id=i, scored=True,
                   value=item[i] + effects.get(r.condition, 0.0) + rng.normal(0, 0.3))
              for r in runs.itertuples() for i in range(n_items)]
    return runs, pd.DataFrame(scores)


def test_a_value_is_compared_with_its_prompt_only_run_and_the_headline_stays_the_controls():
    runs, scores = _table({"value-humor": 1.0, "prompt-humor": 0.6})
    c = contrasts(runs, scores)
    got = {(r.condition, r.reference): r for r in c.itertuples()}
    assert sorted(got) == [("control-0", "base"), ("prompt-humor", "base"), ("value-humor", "base"),
                           ("value-humor", "control"), ("value-humor", "prompt")]
    assert got["value-humor", "prompt"].effect == pytest.approx(0.4, abs=0.15)  # training vs. prompting
    assert got["prompt-humor", "base"].effect == pytest.approx(0.6, abs=0.15)   # prompting vs. nothing
    assert got["prompt-humor", "base"].family == "prompt arm"  # the study's Holm families are unchanged
    v = verdicts(c)
    assert v.set_index("condition").loc["value-humor", "reference"] == "control"
    # without controls the headline is the base model's, not the prompt-only run's
    runs, scores = _table({"value-humor": 1.0}, with_control=False)
    assert verdicts(contrasts(runs, scores)).set_index("condition").loc["value-humor", "reference"] == "base"
    table = prompting_table(c)
    assert list(zip(table["condition"], table["reference"])) == [("value-humor", "prompt"), ("prompt-humor", "base")]


def test_references_of_each_kind():
    base, controls = pd.DataFrame({"run_id": ["b"]}), pd.DataFrame({"run_id": ["c"], "match": [None]})
    prompts = pd.DataFrame({"run_id": ["p1", "p2"], "value": ["humor", "fairness"]})
    names = lambda kind, value: [(n, list(r["run_id"])) for n, r in references(base, controls, kind, value, prompts)]  # noqa: E731
    assert names("value", "humor") == [("base", ["b"]), ("control", ["c"]), ("prompt", ["p1"])]
    assert names("prompt", "humor") == [("base", ["b"])]
    assert names("control", None) == [("base", ["b"])]
    assert names("positive", None) == [("base", ["b"]), ("control", ["c"])]
    assert [n for n, _ in references(base, controls, "value", "humor")] == ["base", "control"]  # no prompt arm


# ----------------------------------------------------------------------------- along training in steps

def test_points_along_training_by_step_leave_the_prompt_arm_out():
    runs, scores = _table({"value-humor": 1.0, "prompt-humor": 0.6})
    runs = runs.assign(progress=1.0, step=np.where(runs["kind"].isin(["base", "prompt"]), np.nan, 8.0))
    runs.loc[runs["kind"] == "base", "progress"] = 0.0
    early = runs[runs["kind"].isin(["value", "control"])].assign(
        run_id=lambda d: d["run_id"] + "__step2", progress=0.25, step=2.0)
    sc = scores.merge(early[["run_id"]].assign(orig=lambda d: d["run_id"].str.removesuffix("__step2")),
                      left_on="run_id", right_on="orig").drop(columns=["run_id_x", "orig"]).rename(
                          columns={"run_id_y": "run_id"})
    sc["value"] -= 0.5 * sc["run_id"].str.contains("value-humor")
    runs, scores = pd.concat([runs, early], ignore_index=True), pd.concat([scores, sc], ignore_index=True)
    pts = points_along_training(runs, scores)
    assert sorted(pts["step"].unique()) == [2.0, 8.0] and "prompt-humor" not in set(pts["condition"])
    assert sorted(pts.loc[pts["condition"] == "value-humor", "progress"].unique()) == [0.25, 1.0]
    trend = trend_along_training(runs, scores)
    row = trend[(trend["condition"] == "value-humor") & (trend["reference"] == "base")].iloc[0]
    assert row["per"] == "step" and row["slope"] == pytest.approx(0.5 / 6, abs=0.03)  # per optimizer step


def test_the_dose_table_gives_each_condition_its_steps_and_epochs():
    runs = pd.DataFrame({"run_id": ["b", "p", "v0", "v1", "c0"], "model": "m",
                         "condition": ["base", "prompt-humor", "value-humor", "value-humor", "control-0"],
                         "kind": ["base", "prompt", "value", "value", "control"],
                         "step": [np.nan, np.nan, 14, 14, 14], "epochs": [np.nan, np.nan, 7.0, 7.0, 2.0]})
    d = dose_table(runs)
    assert d[["condition", "seeds", "steps", "epochs"]].values.tolist() == [["value-humor", 2, 14, 7.0],
                                                                          ["control-0", 1, 14, 2.0]]
    assert dose_table(runs.drop(columns=["step", "epochs"])) is None


def test_the_report_shows_doses_and_training_vs_prompting(tmp_path):
    from evaluation.assemble import AnalysisSettings, analyze_study, build_report_inputs, final_runs
    from evaluation.report import render

    runs, scores = _table({"value-humor": 1.0, "prompt-humor": 0.6})
    runs = runs.assign(progress=np.where(runs["kind"] == "base", 0.0, 1.0),
                       step=np.where(runs["kind"].isin(["base", "prompt"]), np.nan, 14.0),
                       epochs=np.where(runs["kind"] == "value", 7.0, np.where(runs["kind"] == "control", 2.0, np.nan)))
    gens = scores[["run_id", "item_id"]].drop_duplicates().assign(suite="s", response="r")
    res = analyze_study(runs, scores, gens, AnalysisSettings())
    assert set(res.adapters["run_id"]) == set(runs.loc[runs["kind"].isin(["value", "control"]), "run_id"])
    html = render(build_report_inputs(final_runs(runs), scores, res.contrasts), tmp_path).read_text()
    assert ">Doses</h2>" in html and "same number of optimizer steps" in html
    assert ">Training vs. prompting</h2>" in html and "prompt-humor" in html
