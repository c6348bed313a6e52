import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.spec import VALUES, SpecError, content_hash, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def _smoke() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.conditions()


def test_closed_value_list_is_the_papers():
    assert len(VALUES) == 16 and len(set(VALUES)) == 16
    assert {"empathy", "honesty", "humor", "privacy", "engagement"} <= set(VALUES)


def test_every_problem_is_reported_with_its_path():
    d = _smoke()
    d["train"]["beta"] = -1                      # out of range
    d["values"]["induced"] = ["humor", "kindness"]  # not in the closed list
    d["generate"]["colour"] = "blue"             # unknown key
    with pytest.raises(SpecError) as e:
        parse_spec(d, "x.yaml")
    paths = [p for p, _ in e.value.problems]
    assert "train.beta" in paths and "values.induced[1]" in paths and "generate.colour" in paths
    assert len(e.value.problems) == 3


def test_missing_sections_and_cross_checks():
    d = _smoke()
    del d["annotate"]
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert ("annotate", "Field required") in e.value.problems
    d = _smoke()
    d["seeds"] = {"values": [1, 1]}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert {p for p, _ in e.value.problems} == {"seeds.values"}
    d["score"] = {"suites": {"safety": {"judges": ["llm"]}}}  # a suite's own check, at its own field
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert {p for p, _ in e.value.problems} == {"score.suites.safety.llm_judge"}


def test_batch_must_divide():
    d = _smoke()
    d["train"].update(batch_size=6, micro_batch_size=4, workers=2)
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.problems[0][0] == "train"
    assert "multiple of micro_batch_size" in e.value.problems[0][1]


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("study: {name: x\nmodels: [")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "line" in e.value.problems[0][1]


def test_hash_is_stable_and_sensitive():
    a = parse_spec(_smoke())
    b = parse_spec(_smoke())
    assert content_hash(a.train) == content_hash(b.train)
    d = _smoke()
    d["train"]["lr"] = 2e-3
    assert content_hash(parse_spec(d).train) != content_hash(a.train)


def test_cli_validate_prints_all_and_exits_2(tmp_path):
    d = _smoke()
    d["train"]["zero_stage"] = 5
    d["controls"] = {"count": -1}
    d["models"][0]["path"] = 3
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(p)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "3 problem(s)" in r.stderr
    for path in ("train.zero_stage", "controls.count", "models[0].path"):
        assert path in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ positive control

def test_positive_control_defaults_and_conditions():
    assert "positive" not in parse_spec(_smoke() | {"controls": {"count": 2}}).conditions()
    d = _smoke()
    d["controls"] = {"count": 2, "positive": {}}
    spec = parse_spec(d)
    p = spec.controls.positive
    assert (p.phrase, p.position, p.fraction, p.items) == ("Ahoy there!", "start", 1.0, 24)
    assert spec.conditions() == ["value-humor", "value-fairness", "positive", "control-0", "control-1"]
    d["controls"] = {"count": 0, "positive": {"phrase": "Arr matey", "position": "end", "fraction": 0.5, "items": 4}}
    assert parse_spec(d).conditions() == ["value-humor", "value-fairness", "positive"]


def test_min_changed_share_is_refused_naming_what_replaced_it():
    d = _smoke()
    d["analyze"]["min_changed_share"] = 0.05
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    ((path, msg),) = e.value.problems
    assert path == "analyze" and msg.startswith("min_changed_share: replaced by the adapter probe")
    assert "delete the key" in msg


def test_positive_control_validation_names_paths():
    d = _smoke()
    d["controls"] = {"count": 1, "positive": {"phrase": "ab", "position": "middle", "fraction": 0.0, "items": 3,
                                              "colour": "red"}}
    with pytest.raises(SpecError) as e:
        parse_spec(d, "x.yaml")
    paths = {p for p, _ in e.value.problems}
    assert paths == {"controls.positive.phrase", "controls.positive.position", "controls.positive.fraction",
                     "controls.positive.items", "controls.positive.colour"}
    d = _smoke()
    d["controls"] = {"positive": {"phrase": "   a  ", "fraction": 1.5}}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert {p for p, _ in e.value.problems} == {"controls.positive.phrase", "controls.positive.fraction"}
    d = _smoke()
    d["controls"] = {"positive": {}}
    d["data"]["held_out_fraction"] = 0.0
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert [p for p, _ in e.value.problems] == ["controls.positive"]
    assert "held_out_fraction" in e.value.problems[0][1]


def test_positive_control_keys(tmp_path, offline_hub):
    """The phrase enters curation, items and scores; positive.items enters the items key but not
    curation (no retraining for a bigger suite)."""
    from runner.pipeline import Study
    from runner.spec import eval_suites
    from runner.stages.generate import ITEMS

    def study(positive=None):
        d = _smoke()
        d["models"] = [{"name": "m", "path": "org/Model-8B"}]
        d["annotate"]["judge_model"] = "m"
        d["score"]["suites"]["safety"]["llm_judge"] = "m"
        d["controls"].pop("positive", None)
        if positive is not None:
            d["controls"]["positive"] = positive
        return Study(parse_spec(d), base_dir=tmp_path)

    plain, pos = study(), study({})
    assert eval_suites(plain.spec) == list(plain.spec.generate.suites) and eval_suites(pos.spec)[-1] == "planted"
    assert pos.key("curate") != plain.key("curate")
    more_items = study({"items": 48})
    assert more_items.key("curate") == pos.key("curate") and ITEMS(more_items.ctx) != ITEMS(pos.ctx)
    other = study({"phrase": "Arr matey!"})
    assert other.key("curate") != pos.key("curate") and ITEMS(other.ctx) != ITEMS(pos.ctx)
    base = lambda st: next(r for r in st.runs() if r.kind == "base")
    assert other.key("score", base(other)) != pos.key("score", base(pos))
    runs = {r.condition: r for r in pos.runs()}
    assert runs["positive"].kind == "positive" and runs["positive"].value is None
    assert runs["positive"].cell_key == pos.key("train", runs["positive"])
    pos.seeds.extra = {"positive": [5]}
    assert [r.seed for r in pos.runs() if r.condition == "positive"] == [0, 5]
    assert set(pos.runs_table()["kind"]) == {"base", "value", "positive", "control"}


def test_label_smoothing_only_with_cdpo():
    """label_smoothing does nothing outside cDPO (yet it would change the cache key): rejected at its path."""
    for method in ("dpo", "ipo", "sft"):
        d = _smoke()
        d["train"].update(method=method, label_smoothing=0.1)
        with pytest.raises(SpecError) as e:
            parse_spec(d, "x.yaml")
        assert [p for p, _ in e.value.problems] == ["train.label_smoothing"]
        msg = e.value.problems[0][1]
        assert "method: cdpo" in msg and method in msg
        assert "train.label_smoothing: label_smoothing only applies to method: cdpo" in e.value.render()
    d = _smoke()
    d["train"].update(method="cdpo", label_smoothing=0.1)
    assert parse_spec(d).train.label_smoothing == 0.1
    d = _smoke()
    d["train"].update(method="dpo", label_smoothing=0.0)  # the default, spelled out: harmless
    assert parse_spec(d).train.model_dump() == parse_spec(_smoke()).train.model_dump()


def _problems(d) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as e:
        parse_spec(d, "x.yaml")
    return e.value.problems


def test_system_prompt_placeholders_are_validated():
    """Only {value} may be formatted; other names, conversions and stray braces are refused at the field."""
    for bad in ("You value {values}.", "You value {value!r}.", "{}", "JSON: {a: 1}", "a } b", "  "):
        d = _smoke()
        d["train"]["system_prompt"] = bad
        (path, msg), = _problems(d)
        assert path == "train.system_prompt", bad
    d = _smoke()
    d["train"]["system_prompt"] = "Reply as JSON {{like this}}."
    assert parse_spec(d).train.system_text(None) == "Reply as JSON {like this}."


def test_value_template_needs_a_value_for_every_trained_condition():
    """A {value} template with pooled controls is refused at train.system_prompt; controls matched per
    value take it, and the positive arm gets the fixed neutral POSITIVE_SYSTEM_PROMPT, in training and
    (generate.system_prompt: train) in generation; a fixed text goes with every design."""
    from runner.spec import POSITIVE_SYSTEM_PROMPT, generation_system_prompt, training_system_prompt

    d = _smoke()  # pooled controls and a positive arm
    d["train"]["system_prompt"] = "You value {value}."
    problems = _problems(d)
    assert [p for p, _ in problems] == ["train.system_prompt"]
    assert "fixed text or controls.match: per_value" in problems[0][1]
    d["controls"] = {"count": 1, "match": "per_value", "positive": {"phrase": "Ahoy there!"}}
    d["generate"]["system_prompt"] = "train"
    spec = parse_spec(d)
    assert "control-humor-0" in spec.conditions() and "positive" in spec.conditions()
    assert training_system_prompt(spec.train, "positive") == POSITIVE_SYSTEM_PROMPT == "You are a helpful assistant."
    assert generation_system_prompt(spec, "positive", True) == POSITIVE_SYSTEM_PROMPT
    assert training_system_prompt(spec.train, "value-humor") == "You value humor."
    fixed = spec.train.model_copy(update={"system_prompt": "Be brief."})
    assert training_system_prompt(fixed, "positive") == "Be brief."  # a fixed text: every arm's
    d = _smoke()
    d["train"]["system_prompt"] = "You are a careful assistant."
    assert parse_spec(d).train.system_prompt == "You are a careful assistant."


def test_generation_system_prompt():
    """generate.system_prompt: train gives each trained run its own training text; base models get a
    fixed text, never a per-value one; it needs a training system prompt."""
    from runner.spec import generation_system_prompt

    d = _smoke()
    d["generate"]["system_prompt"] = "train"
    assert _problems(d) == [("generate.system_prompt", '"train" generates with the training system prompt, and '
                                                       "train.system_prompt is not set")]
    d["train"]["system_prompt"] = "Be brief."
    fixed = parse_spec(d)
    assert [generation_system_prompt(fixed, c, t) for c, t in [("value-humor", True), ("control-0", True),
                                                               ("base", False)]] == ["Be brief."] * 3
    d["train"]["system_prompt"] = "You value {value}."
    d["controls"] = {"count": 1, "match": "per_value"}
    per_value = parse_spec(d)
    assert generation_system_prompt(per_value, "control-humor-0", True) == "You value humor."
    assert generation_system_prompt(per_value, "base", False) is None
    d["generate"]["system_prompt"] = "none"
    assert generation_system_prompt(parse_spec(d), "value-humor", True) is None


def test_system_prompts_enter_the_train_and_generate_keys(tmp_path, offline_hub):
    from runner.pipeline import Study

    def study(train_sp=None, gen_sp="none"):
        d = _smoke()
        d["models"] = [{"name": "m", "path": "org/Model-8B"}]
        d["annotate"]["judge_model"] = "m"
        d["score"]["suites"]["safety"]["llm_judge"] = "m"
        d["controls"] = {"count": 1, "match": "per_value"}
        d["train"]["system_prompt"] = train_sp
        d["generate"]["system_prompt"] = gen_sp
        return Study(parse_spec(d), base_dir=tmp_path)

    def runs(st):
        return {r.condition: r for r in st.runs()}

    plain, a, b = study(), study("You value {value}."), study("Value {value}.")
    from runner.stages.train import _train_section
    assert "system_prompt" not in _train_section(plain.ctx, None)  # unset: earlier cells keep their keys
    for cond in ("value-humor", "control-humor-0"):
        keys = {plain.key("train", runs(plain)[cond]), a.key("train", runs(a)[cond]), b.key("train", runs(b)[cond])}
        assert len(keys) == 3
    gen = study("You value {value}.", "train")
    assert gen.key("train", runs(gen)["value-humor"]) == a.key("train", runs(a)["value-humor"])
    assert gen.key("generate", runs(gen)["value-humor"]) != a.key("generate", runs(a)["value-humor"])
    assert gen.key("generate", runs(gen)["base"]) == a.key("generate", runs(a)["base"])  # a template: none for base
    fixed, fixed_gen = study("Be brief."), study("Be brief.", "train")
    assert fixed.key("generate", runs(fixed)["base"]) != fixed_gen.key("generate", runs(fixed_gen)["base"])


def test_model_stage_and_base_models_need_a_chat_template(tmp_path, offline_hub):
    d = _smoke()
    d["models"] = [{"name": "b", "path": "org/Model-8B", "stage": "base"}]
    assert [p for p, _ in _problems(d)] == ["models[0].chat_template"]
    d["models"][0]["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    d["models"].append({"name": "s", "path": "org/Model-8B-SFT", "stage": "sft"})  # its tokenizer's, if any
    d["models"].append({"name": "tiny", "path": "tiny-llama"})
    spec = parse_spec(d)
    assert [m.stage for m in spec.models] == ["base", "sft", "instruct"]
    from runner.pipeline import Study
    table = Study(spec, base_dir=tmp_path).runs_table()
    assert table.groupby("model")["stage"].unique().map(list).to_dict() == {
        "b": ["base"], "s": ["sft"], "tiny": ["instruct"]}
    d["models"][1]["stage"] = "chat"
    assert [p for p, _ in _problems(d)] == ["models[1].stage"]


def test_a_tokenizer_without_a_chat_template_is_refused_before_any_stage(tmp_path, tiny_model):
    """The spec cannot see a tokenizer: the study refuses a model with no chat template (its own or
    the spec's) when it starts, naming models[i].chat_template, before annotation spends anything."""
    import shutil

    from runner.pipeline import Study

    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    d = _smoke()
    d["models"] = [{"name": "tiny", "path": "tiny-llama"}, {"name": "bare", "path": str(bare), "stage": "sft"}]
    d["study"]["output_dir"] = str(tmp_path / "studies")
    study = Study(parse_spec(d), base_dir=tmp_path)
    stages = []
    study.on_stage = stages.append
    with pytest.raises(SpecError) as e:
        study.run()
    assert [p for p, _ in e.value.problems] == ["models[1].chat_template"]
    assert "has no chat template" in e.value.problems[0][1] and stages == []
    d["models"][1]["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    Study(parse_spec(d), base_dir=tmp_path).ctx.check_chat_templates()


# ------------------------------------------------------------------ subset_size: all, per-value controls

def _all(d: dict | None = None) -> dict:
    """The smoke spec with the paper's sizes: every eligible pair per value, per-value controls."""
    d = d or _smoke()
    d["controls"] = {"count": 2, "match": "per_value", "aa_check": True}
    d["data"].update(subset_size="all", rule="exactly_one_side_flip")
    return d


def test_subset_size_all_needs_per_value_controls():
    d = _smoke()  # pooled controls and a positive arm: the arm is welcome (the median value size)
    d["data"]["subset_size"] = "all"
    problems = dict(_problems(d))
    assert set(problems) == {"controls.match"}
    assert "set controls.match: per_value" in problems["controls.match"]
    spec = parse_spec(_all())
    assert (spec.data.subset_size, spec.controls.match, spec.data.rule) == ("all", "per_value", "exactly_one_side_flip")
    d = _all()
    d["controls"]["positive"] = {"phrase": "Ahoy there!"}
    assert "positive" in parse_spec(d).conditions()
    d = _smoke()
    d["data"]["subset_size"] = "most"
    assert [p for p, _ in _problems(d)] == ["data.subset_size"]
    assert parse_spec(_smoke()).controls.match == "pooled"


def test_condition_names_round_trip_with_hyphenated_values():
    from runner.spec import parse_condition

    d = _all()
    d["values"]["induced"] = ["open-mindedness", "humor"]
    spec = parse_spec(d)
    assert spec.conditions() == ["value-open-mindedness", "value-humor", "control-open-mindedness-0",
                                 "control-open-mindedness-1", "control-humor-0", "control-humor-1"]
    assert spec.conditions(["humor"]) == ["value-humor", "control-humor-0", "control-humor-1"]
    assert [parse_condition(c) for c in spec.conditions()] == [
        ("value", "open-mindedness", None), ("value", "humor", None), ("control", None, "open-mindedness"),
        ("control", None, "open-mindedness"), ("control", None, "humor"), ("control", None, "humor")]
    assert parse_condition("control-3") == ("control", None, None) and parse_condition("positive")[0] == "positive"
    for bad in ("control-humor", "base", "value-"):
        with pytest.raises(ValueError):
            parse_condition(bad)


def test_runs_of_per_value_controls_and_of_kept_values_only(tmp_path):
    """Per-value controls are control runs that carry their value; under subset_size: all the runs
    are those of the values curation kept, known once curate is done."""
    from runner.pipeline import Study
    from runner.store import write_json

    d = _all()
    d["study"]["output_dir"] = str(tmp_path)
    d["data"]["subset_size"] = 4
    runs = Study(parse_spec(d), base_dir=tmp_path).runs()
    controls = [r for r in runs if r.condition.startswith("control-")]
    assert {(r.condition, r.kind, r.value, r.match) for r in controls} == {
        (f"control-{v}-{k}", "control", None, v) for v in ("humor", "fairness") for k in (0, 1)}
    assert all(r.match is None for r in runs if not r.condition.startswith("control-"))

    study = Study(parse_spec(_all(d)), base_dir=tmp_path)
    assert not study.runs_known()
    assert [r["stage"] for r in study.status()] == ["annotate", "curate"]  # no run before curation
    unit = study.store.unit("curate", study.key("curate"))
    write_json({"rule": {"kept": ["fairness"], "dropped": {"humor": 2}}}, unit / "curation.json")
    study.store.mark_done("curate", study.key("curate"), {"summary": "synthetic"})
    assert study.runs_known()
    assert [r.condition for r in study.runs()] == ["base", "value-fairness", "control-fairness-0",
                                                   "control-fairness-1"]
    table = study.runs_table()
    assert table.set_index("condition")["match"].dropna().to_dict() == {
        "control-fairness-0": "fairness", "control-fairness-1": "fairness"}
    assert len(study.status()) > 2


def test_added_seeds_go_to_the_matched_controls(tmp_path):
    from runner.pipeline import Study

    d = _all()
    d["study"]["output_dir"] = str(tmp_path)
    d["data"]["subset_size"] = 4
    d["seeds"] = {"values": [0], "adaptive": {"target_ci_halfwidth": 0.1, "max": 3}}
    study = Study(parse_spec(d), base_dir=tmp_path)
    before = {r.run_id for r in study.runs()}
    assert study.seeds.add(["value-humor"]) == 1
    assert {r.run_id for r in study.runs()} - before == {
        "tiny__value-humor__s1", "tiny__control-humor-0__s1", "tiny__control-humor-1__s1"}


def test_annotate_check_validation_and_judge_listing(tmp_path):
    from runner.pipeline import Study

    d = _smoke()
    assert parse_spec(d).annotate.check is None  # off by default
    d["annotate"]["check"] = {"sample": 0}
    assert {p for p, _ in _problems(d)} == {"annotate.check.judge_model", "annotate.check.sample"}
    d["annotate"]["check"] = {"judge_model": "tiny"}  # the labeller itself
    assert _problems(d) == [("annotate.check.judge_model", "is annotate.judge_model: the check needs another judge")]
    d["annotate"]["check"] = {"judge_model": "org/Judge-70B"}
    d["annotate"]["engine"] = {"tensor_parallel": 4, "max_model_len": 4096}
    d["study"]["output_dir"] = str(tmp_path)
    spec = parse_spec(d)
    assert spec.annotate.check.sample == 200
    ctx = Study(spec, base_dir=tmp_path).ctx
    assert "org/Judge-70B" in ctx.judge_models()  # pools, plan and the chat-template check see it
    assert ctx.engine_spec("org/Judge-70B").tensor_parallel == 4  # the judges' engine
    assert ctx._template_field("org/Judge-70B")[0] == "annotate.check.judge_model"
