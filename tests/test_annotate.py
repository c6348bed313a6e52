"""Annotation: resumable after a kill, and the judge audit round trip."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from runner.data.audit import audit_agreement, audit_sample, read_labels
from runner.data.sources import DataError

ROOT = Path(__file__).resolve().parent.parent


def _ann():
    pairs = pd.DataFrame({"pair_id": ["a", "b", "c"], "prompt": [[{"role": "user", "content": "q"}]] * 3,
                          "chosen": ["c1", "c2", "c3"], "rejected": ["r1", "r2", "r3"]})
    ann = pd.DataFrame({"pair_id": ["a", "a", "b", "b", "c", "c"], "side": ["chosen", "rejected"] * 3,
                        "values": [["empathy"], [], ["empathy", "honesty"], ["honesty"], [], []],
                        "scored": [True, True, True, True, False, True], "raw": [""] * 6})
    return pairs, ann


def test_audit_sample_is_stratified_and_skips_unscored():
    pairs, ann = _ann()
    s = audit_sample(pairs, ann, n=10)
    assert set(s.columns) >= {"pair_id", "side", "conversation", "response", "judge_values", "human_values"}
    assert not ((s.pair_id == "c") & (s.side == "chosen")).any()
    assert {"empathy", "honesty", "none"} <= {v for x in s.judge_values for v in x.split(", ")}


def test_audit_agreement_per_value(tmp_path):
    pairs, ann = _ann()
    labels = pd.DataFrame({"pair_id": ["a", "a", "b", "b"], "side": ["chosen", "rejected"] * 2,
                           "human_values": ["empathy", "none", "empathy", "empathy, honesty"]})
    p = tmp_path / "l.csv"
    labels.to_csv(p, index=False)
    agree = audit_agreement(read_labels(p), ann).set_index("value")
    assert agree.loc["empathy", "accuracy"] == 0.75 and agree.loc["honesty", "accuracy"] == 0.75
    assert agree.loc["empathy", "n"] == 4


def test_audit_labels_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"pair_id": ["a"], "side": ["chosen"], "human_values": ["kindness"]}).to_csv(p, index=False)
    with pytest.raises(DataError, match="bad.csv.*kindness"):
        read_labels(p)
    p.write_text("pair_id,side\na,chosen\n")
    with pytest.raises(DataError, match="missing column"):
        read_labels(p)


def _labels(rows):
    """(pair_id, side, values or None for unscored) → a judge_values-shaped table."""
    return pd.DataFrame({"pair_id": [r[0] for r in rows], "side": [r[1] for r in rows],
                         "values": [r[2] or [] for r in rows], "scored": [r[2] is not None for r in rows]})


def test_check_agreement_precision_recall_kappa():
    from evaluation.types import VALUES
    from runner.data.audit import check_agreement

    labeller = _labels([("a", "chosen", ["empathy", "honesty"]), ("a", "rejected", ["empathy"]),
                        ("b", "chosen", []), ("b", "rejected", ["honesty"]), ("c", "chosen", ["humor"]),
                        ("c", "rejected", None), ("d", "chosen", ["humor"])])
    check = _labels([("a", "chosen", ["empathy"]), ("a", "rejected", ["empathy", "honesty"]),
                     ("b", "chosen", ["honesty"]), ("b", "rejected", ["honesty"]), ("c", "chosen", None),
                     ("c", "rejected", ["humor"])])  # d/chosen was not sampled
    t = check_agreement(labeller, check).set_index("value")
    assert list(t.index) == [*VALUES, "all"]
    assert (t["n"] == 4).all()  # c/chosen, c/rejected: unscored by one judge; d: not checked
    e, h, hu, a = t.loc["empathy"], t.loc["honesty"], t.loc["humor"], t.loc["all"]
    assert (e.labeller_yes, e.check_yes, e.both_yes, e.precision, e.recall, e.kappa) == (2, 2, 2, 1.0, 1.0, 1.0)
    # honesty: labeller 1,0,0,1 against check 0,1,1,1: po = 1/4, pe = .5·.75 + .5·.25 = .5
    assert (h.labeller_yes, h.check_yes, h.both_yes) == (2, 3, 1)
    assert h.precision == 0.5 and h.recall == pytest.approx(1 / 3) and h.kappa == pytest.approx(-0.5)
    assert pd.isna(hu.precision) and pd.isna(hu.recall) and pd.isna(hu.kappa)  # nobody said humor
    # all 64 (response, value) decisions: 3 both, 1 labeller only, 2 check only, 58 neither
    assert (a.labeller_yes, a.check_yes, a.both_yes, a.precision, a.recall) == (4, 5, 3, 0.75, 0.6)
    po, pe = 61 / 64, (4 * 5 + 60 * 59) / 64 ** 2
    assert a.kappa == pytest.approx((po - pe) / (1 - pe))


def _population(seed=0):
    """A synthetic labelled population: 2,000 responses, the labeller's values and the check judge's.

    Labeller: 300 'humor' (the check agrees on 90%), 100 'fairness' (30%), 1,600 none (the check
    finds one of the two values in 20%): population precision .75, recall (270+30)/(300+320) = .484."""
    rng = np.random.default_rng(seed)
    lab = ["humor"] * 300 + ["fairness"] * 100 + [None] * 1600
    chk = []
    for v in lab:
        if v is not None:
            chk.append([v] if rng.random() < (0.9 if v == "humor" else 0.3) else [])
        else:
            chk.append([str(rng.choice(["humor", "fairness"]))] if rng.random() < 0.2 else [])
    n = len(lab)
    ids = {"pair_id": [f"p{i // 2}" for i in range(n)], "side": ["chosen", "rejected"] * (n // 2)}
    labeller = pd.DataFrame({**ids, "values": [[v] if v else [] for v in lab], "scored": True})
    check = pd.DataFrame({**ids, "values": chk, "scored": True})
    pairs = pd.DataFrame({"pair_id": [f"p{i}" for i in range(n // 2)],
                          "prompt": [[{"role": "user", "content": "q"}]] * (n // 2), "chosen": "c", "rejected": "r"})
    return pairs, labeller, check


def test_random_check_sample_recovers_population_precision_and_recall():
    """annotate.check's random sample estimates the population's pooled precision and recall; the
    labeller-stratified sample it replaced over-weights the rare value (precision biased down) and
    under-draws the responses the labeller gave no value (recall inflated)."""
    from runner.data.audit import check_agreement, random_sample

    pairs, labeller, check = _population()
    pop = check_agreement(labeller, check).set_index("value").loc["all"]
    assert pop.precision == pytest.approx(0.75, abs=0.05) and pop.recall == pytest.approx(0.48, abs=0.05)

    def mean_all(draw):
        rows = [check_agreement(labeller, check.merge(draw(s), on=["pair_id", "side"])).set_index("value").loc["all"]
                for s in range(60)]
        return np.mean([r.precision for r in rows]), np.mean([r.recall for r in rows])

    rnd = mean_all(lambda s: random_sample(labeller, 200, seed=s))
    strat = mean_all(lambda s: audit_sample(pairs, labeller, 200, seed=s)[["pair_id", "side"]])
    print(f"population precision {pop.precision:.3f} recall {pop.recall:.3f}; mean of 60 samples of 200: "
          f"random {rnd[0]:.3f} / {rnd[1]:.3f}, stratified {strat[0]:.3f} / {strat[1]:.3f}")
    assert abs(rnd[0] - pop.precision) < 0.03 and abs(rnd[1] - pop.recall) < 0.03
    assert strat[0] < pop.precision - 0.1 and strat[1] > pop.recall + 0.3  # what the stratified sample gave
    s = random_sample(labeller.assign(scored=[i % 3 > 0 for i in range(len(labeller))]), 5000, seed=1)
    assert len(s) == 1333 and not s.duplicated().any()  # every scored response once, no unscored one


class _StubJudge:
    """A check judge that reports empathy for ALPHA-C, honesty for BETA-R and none otherwise."""

    def __init__(self):
        self.requests = []

    def generate(self, requests, desc=None):
        from evaluation.judges.values import VALUE_GRAMMAR
        assert all(r.grammar == VALUE_GRAMMAR for r in requests)  # the labeller's prompt
        self.requests += requests
        text = [r.messages[-1]["content"] for r in requests]
        return ["empathy" if "ALPHA-C" in t else "honesty" if "BETA-R" in t else "none" for t in text]


def _check_study(tmp_path, sample=10):
    from runner.pipeline import Study
    from runner.spec import parse_spec
    from runner.store import write_json, write_parquet

    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    d["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    d["annotate"]["check"] = {"judge_model": "org/Judge-70B", "sample": sample}
    study = Study(parse_spec(d), base_dir=tmp_path)
    pairs, ann = _ann()
    pairs = pairs.assign(chosen=["ALPHA-C", "BETA-C", "GAMMA-C"], rejected=["ALPHA-R", "BETA-R", "GAMMA-R"])
    unit = study.store.unit("annotate", study.key("annotate"))
    write_parquet(pairs, unit / "pairs.parquet")
    write_parquet(ann, unit / "annotations.parquet")
    write_json({}, unit / "drops.json")
    study.store.mark_done("annotate", study.key("annotate"), {"pairs": 3, "unscored": 1})
    return study


def test_the_check_runs_after_annotation_under_its_own_key(tmp_path, capsys, monkeypatch, offline_hub):
    import mlflow

    from runner.stages import annotate
    from runner.store import read_parquet

    study = _check_study(tmp_path)
    judge = _StubJudge()
    monkeypatch.setattr(study.ctx.pools, "get", lambda model, **kw: judge if model == "org/Judge-70B" else None)
    annotate.run(study.ctx)
    assert len(judge.requests) == 5  # every scored response (c/chosen is unscored)
    out = capsys.readouterr().out
    # empathy: labeller a/c, b/c, check a/c; honesty: labeller b/c, b/r, check b/r; kappa over 80
    # decisions (2 both, 2 labeller only, 76 neither): po = 78/80, pe = (4·2 + 76·78)/80², κ = 304/464
    assert "labeller vs org/Judge-70B on 5 responses: precision 50.00%, recall 100.00%, kappa 0.655" in out
    unit = study.store.unit("annotate_check", study.key("annotate_check"))
    t = read_parquet(unit / "agreement.parquet").set_index("value")
    assert t.loc["empathy", "precision"] == 0.5 and t.loc["honesty", "recall"] == 1.0
    assert pd.read_csv(unit / "agreement.csv").shape == (17, 8)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = study.ctx.tracker.parent()
    assert client.get_run(parent).data.metrics["check/all/precision"] == 0.5
    assert {a.path for a in client.list_artifacts(parent, "annotate_check")} == {
        "annotate_check/agreement.csv", "annotate_check/agreement.parquet"}
    assert annotate.check_result(study.ctx)["table"].equals(read_parquet(unit / "agreement.parquet"))

    # a rerun is cached; a changed sample re-checks without relabelling the data
    again = _check_study(tmp_path)
    monkeypatch.setattr(again.ctx.pools, "get", lambda model, **kw: pytest.fail("the check was cached"))
    annotate.run(again.ctx)
    assert "annotate check: cached" in capsys.readouterr().out
    other = _check_study(tmp_path, sample=2)
    assert other.key("annotate") == study.key("annotate")
    assert other.key("annotate_check") != study.key("annotate_check")
    assert ("annotate_check", "labeller check", other.key("annotate_check"), "missing") in [
        tuple(r.values()) for r in other.status()]


def test_the_report_shows_the_check(tmp_path):
    from evaluation.assemble import build_report_inputs
    from evaluation.report import render
    from evaluation.report_inputs import LabelCheck, StudyInfo, StudyTables

    def write_report(info: StudyInfo, tables: StudyTables | None = None):
        return render(build_report_inputs(None, None, None, info, tables), tmp_path)

    table = pd.DataFrame({"value": ["empathy", "all"], "n": [5, 5], "precision": [0.5, 0.5]})
    html = write_report(StudyInfo(label_check=LabelCheck(judge="org/Judge-70B", labeller="tiny")),
                        StudyTables(label_check=table)).read_text()
    assert "Value labeller against org/Judge-70B" in html and "<td class=s>empathy</td>" in html
    assert "Value labeller against" not in write_report(StudyInfo()).read_text()


@pytest.mark.slow
def test_the_check_with_real_tiny_judges(tmp_path, data_dir, tiny_model):
    """The labeller (the tiny random model) against SmolLM2-135M on real engines, through the CLI."""
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path)
    spec["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    spec["data"]["sources"][0]["max_pairs"] = 6
    spec["annotate"]["check"] = {"judge_model": "smollm2-135m", "sample": 8}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = subprocess.run([sys.executable, "-m", "runner.cli", "annotate", str(path)], cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "annotate check: labeller vs smollm2-135m on " in r.stdout
    t = pd.read_parquet(next((tmp_path / "smoke" / "stages" / "annotate_check").glob("*/agreement.parquet")))
    assert list(t["value"])[-1] == "all" and 1 <= t["n"].iloc[0] <= 8
