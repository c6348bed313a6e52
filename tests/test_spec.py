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
    d["score"] = {"refusal_judges": ["llm"]}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert {p for p, _ in e.value.problems} == {"seeds.values", "score.refusal_llm_judge"}


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
    assert spec.analyze.min_changed_share == 0.05
    d["controls"] = {"count": 0, "positive": {"phrase": "Arr matey", "position": "end", "fraction": 0.5, "items": 4}}
    assert parse_spec(d).conditions() == ["value-humor", "value-fairness", "positive"]


def test_positive_control_validation_names_paths():
    d = _smoke()
    d["controls"] = {"count": 1, "positive": {"phrase": "ab", "position": "middle", "fraction": 0.0, "items": 3,
                                              "colour": "red"}}
    d["analyze"]["min_changed_share"] = 1.5
    with pytest.raises(SpecError) as e:
        parse_spec(d, "x.yaml")
    paths = {p for p, _ in e.value.problems}
    assert paths == {"controls.positive.phrase", "controls.positive.position", "controls.positive.fraction",
                     "controls.positive.items", "controls.positive.colour", "analyze.min_changed_share"}
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


def test_positive_control_keys(tmp_path):
    """The phrase enters curation, items and scores; positive.items enters the items key but not
    curation (no retraining for a bigger suite)."""
    from runner.pipeline import Study
    from runner.spec import eval_suites
    from runner.stages.generate import ITEMS

    def study(positive=None):
        d = _smoke()
        d["models"] = [{"name": "m", "path": "org/Model-8B"}]
        d["annotate"]["judge_model"] = "m"
        d["score"]["refusal_llm_judge"] = "m"
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
