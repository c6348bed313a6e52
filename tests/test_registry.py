"""Registries: a suite added by registering one module runs through the real score and analyze
stages, `valind plan` and spec validation; the key table in docs/ARCHITECTURE.md is generated."""
import importlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runner.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent


def _spec(tmp_path) -> dict:
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    d["values"]["induced"] = ["humor"]
    d["controls"] = {"count": 1}
    d["seeds"] = {"values": [0, 1]}
    d["generate"] = {"suites": ["toy"], "sampling": {"max_tokens": 8}}
    d["score"] = {"suites": {"safety": {"judges": ["strmatch"]}}}
    d["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return d


def test_unregistered_suite_is_refused_with_the_known_names(tmp_path):
    d = _spec(tmp_path)
    d["generate"]["suites"] = ["nope"]
    with pytest.raises(SpecError, match=r"generate\.suites: unknown suite\(s\) \['nope'\]; known: anthropomorphism, safety, sycophancy, values"):
        parse_spec(d)


def test_a_suite_registered_by_one_module_runs_through_score_and_analysis(tmp_path, data_dir):
    import toy_suite  # noqa: F401  (registers "toy"; nothing else is touched)

    from runner.pipeline import Study
    from runner.plan import estimate
    from runner.store import write_json, write_parquet

    spec = parse_spec(_spec(tmp_path))
    assert estimate(spec).counts["items per run"] == len(toy_suite.PROMPTS)
    study = Study(spec, "", base_dir=tmp_path)
    # Upstream stages as a finished run would have left them (training is tested elsewhere).
    study.store.mark_done("annotate", study.key("annotate"), {"pairs": 8, "unscored": 0, "drops": {},
                                                              "value_counts": {}})
    cur = study.store.unit("curate", study.key("curate"))
    write_parquet(pd.DataFrame({"value": ["humor"], "available": [8], "used": [4]}), cur / "table.parquet")
    write_json({"rule": "chosen"}, cur / "curation.json")
    study.store.mark_done("curate", study.key("curate"), {"summary": "synthetic"})
    items = toy_suite.load_items(None, None, 0)
    for r in study.runs():
        if r.cell_key:
            unit = study.store.unit("train", r.cell_key)
            (unit / "model").mkdir(parents=True)
            (unit / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
            write_json({"train": spec.train.model_dump(mode="json"), "bf16": False}, unit / "cell.json")
            study.store.mark_done("train", r.cell_key)
        # the induced arm says yes to 6 of 8 items, everything else to none
        said = ["yes" if (r.kind == "value" and i < 6) else "no" for i in range(len(items))]
        key = study.key("generate", r)
        write_parquet(pd.DataFrame({"run_id": r.run_id, "suite": "toy", "item_id": items["item_id"],
                                    "response": said}), study.store.unit("generate", key) / "generations.parquet")
        study.store.mark_done("generate", key)

    report = study.run("analyze")

    scores = pd.concat(pd.read_parquet(study.store.unit("score", study.key("score", r)) / "scores.parquet")
                       for r in study.runs())
    assert set(scores["suite"]) == {"toy"} and set(scores["judge"]) == {"toy-exact"}
    assert scores.groupby("run_id")["value"].mean().to_dict() == {
        "tiny__base": 0, "tiny__control-0__s0": 0, "tiny__control-0__s1": 0,
        "tiny__value-humor__s0": 0.75, "tiny__value-humor__s1": 0.75}
    con = pd.read_parquet(study.store.unit("analyze", study.key("analyze")) / "contrasts.parquet")
    vs_control = con[(con["suite"] == "toy") & (con["condition"] == "value-humor") & (con["reference"] == "control")]
    assert len(vs_control) == 1 and vs_control["effect"].iloc[0] == pytest.approx(0.75)
    assert "toy" in report.read_text()
    assert all(s["state"] == "done" for s in study.status())


def test_key_table_in_the_architecture_doc_is_generated():
    import subprocess
    import sys

    from runner.stages import key_table
    printed = subprocess.run([sys.executable, "-m", "runner.stages"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, check=True).stdout.strip()
    assert printed == key_table()
    assert printed in (ROOT / "docs" / "ARCHITECTURE.md").read_text(), "regenerate it: python -m runner.stages"


# ------------------------------------------------------------------ plugins (evaluation.registry)

def test_the_example_plugin_is_found_by_its_entry_point():
    """examples/valind-toy-suite, installed (make setup), registers its suite and LLM judge on the
    registries' first lookup: nothing in valind names it."""
    from evaluation.judges.registry import JUDGES
    from evaluation.suites.registry import SUITES, listable

    assert "greeting" in SUITES and SUITES.plugin("greeting") == "toy"
    assert "greeting" in listable() and "greeting" not in listable(plugins=False)  # never on by default
    assert JUDGES.get("greeting-llm").needs_model


def test_a_plugin_suite_setting_is_validated_at_its_yaml_path(tmp_path):
    d = _spec(tmp_path)
    d["generate"]["suites"] = ["greeting"]
    d["score"]["suites"] = {"greeting": {"phrase": "", "colour": "red"}, "nope": {}}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    problems = dict(e.value.problems)
    assert set(problems) == {"score.suites.greeting.phrase", "score.suites.greeting.colour", "score.suites.nope"}
    assert "unknown suite; known: anthropomorphism, " in problems["score.suites.nope"] and "greeting" in problems["score.suites.nope"]
    d["score"]["suites"] = {"greeting": {"phrase": "ahoy", "judge": "tiny"}}
    spec = parse_spec(d)
    assert spec.judge_models() == {"tiny"} and spec.score.suite("greeting").phrase == "ahoy"


def test_moved_score_keys_say_where_they_went(tmp_path):
    d = _spec(tmp_path)
    d["score"] = {"refusal_llm_judge": "tiny"}
    with pytest.raises(SpecError, match=r"score: refusal_llm_judge is now score.suites.safety.llm_judge"):
        parse_spec(d)


def _dist(tmp_path, name: str, module: str, body: str):
    """A distribution on sys.path declaring a valind.plugins entry point."""
    (tmp_path / f"{module}.py").write_text(body)
    info = tmp_path / f"{name}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[valind.plugins]\n{name} = {module}\n")


def test_plugins_load_once_and_a_broken_one_is_named(tmp_path, monkeypatch):
    from evaluation import registry

    _dist(tmp_path, "plugok", "plug_ok", "from evaluation.registry import Registry\nR = Registry('thing')\n"
                                          "import plug_count\nplug_count.n += 1\n")
    (tmp_path / "plug_count.py").write_text("n = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "plugok" in registry.load_plugins() and registry.load_plugins() == []
    import plug_count
    assert plug_count.n == 1
    _dist(tmp_path, "plugbad", "plug_bad", "raise RuntimeError('no GPU here')\n")
    importlib.invalidate_caches()  # the new dist-info, for importlib.metadata
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(registry.PluginError, match=r"valind plugin 'plugbad' \(plugbad entry point 'plug_bad'\) "
                                                   r"failed to load: RuntimeError: no GPU here"):
        registry.load_plugins()


def test_a_registry_refuses_a_second_thing_under_one_name_and_lists_the_known_ones():
    from evaluation.registry import Registry

    r: Registry[int] = Registry("widget")
    r.register("a")(1)
    r.add("a", 1)  # the same thing again (a module imported twice) is fine
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        r.add("a", 2)
    with pytest.raises(KeyError, match="unknown widget 'b'; known: a"):
        r.get("b")
