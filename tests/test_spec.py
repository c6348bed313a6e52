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
