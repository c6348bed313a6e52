"""The report renders a stored ReportInputs and computes nothing: saved, loaded and rendered, it gives
the report of the analysis that made it, with every analysis function made to fail."""
from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from evaluation.assemble import AnalysisSettings, analyze_study, build_report_inputs
from evaluation.report import render
from evaluation.report_inputs import JudgeCheck, LabelCheck, StudyInfo, StudyTables, SystemPrompt, load, save
from runner.data.matching import condition_table
from test_analyze import _planted_study, make_study

# Every function that computes something the report shows (evaluation.analyze and its parts, the
# claims, the adapter verdicts, the report inputs' own helpers): rendering may call none of them.
COMPUTING = ("per_run_metrics", "contrasts", "mark_primary", "verdicts", "positive_control", "coexpression",
             "crosstalk_tests", "aa_check", "power_table", "points_along_training", "trend_along_training",
             "claims_table", "adapter_check", "adapter_verdicts", "build_report_inputs", "analyze_study",
             "short_judges", "by_stage", "condition_summary", "judge_provenance", "crossed_test", "simes",
             "pool_contrasts", "random_effects", "stage_test", "with_equivalence", "tost_p")


@pytest.fixture(scope="module")
def inputs():
    """A study with every section filled: values with co-expression, a positive control, an A/A
    check, the adapter check, two stages, judge agreement, curation, the labeller check."""
    runs, scores = make_study({("empathy", "expresses/empathy"): 0.35, ("empathy", "expresses/care"): 0.2},
                              n_items=30, seeds=(0, 1), models=("m1", "m2"))
    runs["stage"] = runs["model"].map({"m1": "base", "m2": "instruct"})
    prun, pscores = _planted_study(0.9, seeds=(0, 1), n_items=20)
    prun = prun.assign(model="m1", run_id="p-" + prun["run_id"]).query("kind == 'positive'").assign(stage="base")
    runs = pd.concat([runs, prun], ignore_index=True)
    pscores = pscores.assign(run_id="p-" + pscores["run_id"])
    scores = pd.concat([scores, pscores[pscores["run_id"].isin(prun["run_id"])]], ignore_index=True)
    base = pscores[(pscores["run_id"] == "p-base") & (pscores["suite"] == "planted")]
    scores = pd.concat([scores, base.assign(run_id="m1-base"), *(base.assign(run_id=r) for r in
                        runs.loc[(runs["model"] == "m1") & (runs["kind"] != "positive") & (runs["kind"] != "base"),
                                 "run_id"])], ignore_index=True)
    gens = scores[["run_id", "suite", "item_id"]].drop_duplicates().assign(response="x")
    res = analyze_study(runs, scores, gens, AnalysisSettings(min_effect=0.1, aa_check=True))
    info = StudyInfo(name="Stored <study>", description="d", spec_yaml="a: 1", code_version="v (abc)", alpha=0.05,
                     system_prompt=SystemPrompt("You value {value}.", True, "train"), eval_at=(0.5, 1.0),
                     positive_values=("empathy",), adaptive="seeds.adaptive: none",
                     curation_rule={"rule": "r", "description": "x", "subset_size": "all", "N": None,
                                    "controls": {"match": "pooled"}, "dropped": {"humor": 3}, "min_subset_size": 9},
                     label_check=LabelCheck("big", "tiny"), score_check=JudgeCheck("check-judge", 8, 3))
    agreement = pd.DataFrame(dict(judge=["strmatch"], n=[50], accuracy=[0.7], kappa=[0.4]))
    tables = StudyTables(power=res.power, aa=res.aa, aa_detail=res.aa_detail, adapters=res.adapters,
                         judge_agreement=agreement, curation=pd.DataFrame({"value": ["empathy"], "used": [10]}),
                         conditions=condition_table({"control-0": pd.DataFrame({"source": ["a"], "length": [3]})}),
                         label_check=pd.DataFrame({"value": ["all"], "kappa": [0.5]}),
                         pooled=res.pooled, stage_test=res.stage_test, score_check=_score_check())
    assert res.pooled is not None and res.stage_test is not None  # two models, two stages
    return build_report_inputs(runs, scores, res.contrasts, info, tables)


def _score_check() -> pd.DataFrame:
    """score.check's table (evaluation.agreement) of a binary and an ordinal judge."""
    from evaluation.agreement import agreement
    rows = lambda judge, metric, vals: pd.DataFrame(  # noqa: E731
        [{"run_id": "r", "suite": "s", "item_id": f"i{k}", "metric": metric, "value": float(v), "scored": True,
          "judge": judge, "raw": ""} for k, v in enumerate(vals)])
    return agreement(pd.concat([rows("llm:a", "refusal", [1, 0, 1, 1]), rows("rubric:a", "score", [0, 3, 5, 2])]),
                     pd.concat([rows("llm:b", "refusal", [1, 0, 0, 1]), rows("rubric:b", "score", [1, 3, 4, 2])]))


def test_the_score_check_section(inputs, tmp_path):
    html = render(inputs, tmp_path).read_text()
    part = html.split("Judges on the trained runs' responses</h2>")[1].split("<h2")[0]
    assert "check-judge re-scored a uniform random sample of 8 responses per suite (seed 3" in part
    assert "Binary judges" in part and "Ordinal and continuous" in part and "weighted_kappa" in part


def _make_computing_fail(monkeypatch) -> int:
    """Replace every COMPUTING function in every loaded evaluation module with one that raises."""
    def fail(*a, **k):
        raise AssertionError("the report recomputed part of the analysis")
    n = 0
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "evaluation" and module is not None:
            for f in COMPUTING:
                if callable(getattr(module, f, None)):
                    monkeypatch.setattr(module, f, fail)
                    n += 1
    return n


def test_a_stored_report_renders_as_it_was_without_recomputing(inputs, tmp_path, monkeypatch):
    fresh = render(inputs, tmp_path / "fresh").read_text()
    for part in ("Sensitivity.</b> m1: positive control", "Specificity.</b>", "Whole-matrix test</h3><p",
                 "<h3>base models</h3>", "Value labeller against big", "Dropped value(s)", "inducing empathy", "3 [3–3]"):
        assert part in fresh  # every section has something to show
    save(inputs, tmp_path / "store")
    assert _make_computing_fail(monkeypatch) > 20
    with pytest.raises(AssertionError, match="recomputed"):  # the trap is armed
        build_report_inputs(inputs.runs, None, inputs.contrasts)
    stored = render(load(tmp_path / "store"), tmp_path / "again").read_text()
    assert stored == fresh
    assert sorted(p.name for p in (tmp_path / "again" / "figures").iterdir()) == \
        sorted(p.name for p in (tmp_path / "fresh" / "figures").iterdir())


def test_report_inputs_round_trip(inputs, tmp_path):
    back = load(save(inputs, tmp_path / "store"))
    assert back.info == inputs.info and back.generated == inputs.generated
    assert back.sensitivity == inputs.sensitivity and back.adapter_verdicts == inputs.adapter_verdicts
    for name in ("runs", "contrasts", "claims", "coexpression", "crosstalk", "per_run", "provenance",
                 "condition_summary"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(inputs, name), check_dtype=False,
                                      check_index_type=False, obj=name)
    assert back.along_points is None and back.tables.along is None and back.tables.trend is None
    pd.testing.assert_frame_equal(back.tables.aa, inputs.tables.aa, check_dtype=False, obj="tables.aa")
    assert render(back, tmp_path / "b").read_text() == render(inputs, tmp_path / "a").read_text()


def test_load_names_what_is_wrong(inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="report_inputs.json: no stored report inputs"):
        load(tmp_path / "nothing")
    path = save(inputs, tmp_path / "store") / "report_inputs.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format": 0}))
    with pytest.raises(ValueError, match=r"report_inputs.json: format 0, this code reads format 1"):
        load(tmp_path / "store")
