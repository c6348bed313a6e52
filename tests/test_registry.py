"""Registries: a suite added by registering one module runs through the real score and analyze
stages, `valind plan` and spec validation; the key table in docs/ARCHITECTURE.md is generated."""
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
    d["score"] = {"refusal_judges": ["strmatch"]}
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
