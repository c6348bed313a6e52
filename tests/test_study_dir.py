"""One driver per study directory (a lock), one spec per study directory (study.json), and the MLflow
parent run that follows the spec. Two real `valind run`s started together: tests/test_e2e.py."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evaluation.errors import InputError
from runner.spec import parse_spec
from runner.study_dir import StudyBusy, StudyLock, claim

ROOT = Path(__file__).resolve().parent.parent


def _spec(tmp_path, **changes) -> dict:
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path / "studies")
    for path, value in changes.items():
        section, field = path.split("__")
        d.setdefault(section, {})[field] = value
    return d


def test_a_second_driver_exits_at_once_naming_the_first(tmp_path):
    root = tmp_path / "studies" / "smoke"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from runner.study_dir import StudyLock\n"
         f"with StudyLock(__import__('pathlib').Path({str(root)!r}), 'valind run first.yaml'):\n"
         "    print('held', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        spec = tmp_path / "smoke.yaml"
        spec.write_text(yaml.safe_dump(_spec(tmp_path)))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(spec)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 1, r.stderr
        assert f"in use by another valind: pid {holder.pid} on host" in r.stderr
        assert "(valind run first.yaml)" in r.stderr
        assert time.perf_counter() - t0 < 60  # at once: no model, no Ray, no compute
        assert not (root / "study.json").exists()  # it touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with StudyLock(root, "after"):  # the kernel released the dead holder's lock
        with pytest.raises(StudyBusy, match="started"):
            with StudyLock(root, "second"):
                pass


def test_another_spec_under_the_same_name_is_refused(tmp_path):
    root = tmp_path / "study"
    first = parse_spec(_spec(tmp_path))
    claim(root, first)
    claim(root, first)  # the same spec again
    claim(root, parse_spec(_spec(tmp_path, engine__actors=3, tracking__uri="sqlite:///x.db")))  # cannot change results
    changed = parse_spec(_spec(tmp_path, train__lr=5e-6, score__benchmarks=[]))
    with pytest.raises(InputError) as e:
        claim(root, changed)
    msg = str(e.value)
    assert "train.lr (0.001 -> 5e-06)" in msg and "score.benchmarks" in msg and "--amend" in msg
    assert "study.json" in msg
    claim(root, changed, amend=True)
    rec = yaml.safe_load((root / "study.json").read_text())
    assert rec["history"][-1]["change"].startswith("amended: ") and "train.lr" in rec["history"][-1]["change"]


def test_a_spec_that_only_adds_work_is_allowed_and_shown(tmp_path, capsys):
    root = tmp_path / "study"
    d = _spec(tmp_path)
    claim(root, parse_spec(d))
    more = copy.deepcopy(d)
    more["seeds"]["values"] = [0, 1]
    more["values"]["induced"] = ["humor", "fairness", "empathy"]
    more["controls"]["count"] = 3
    more["models"].append({"name": "tiny2", "path": "tiny-llama"})
    claim(root, parse_spec(more))
    out = capsys.readouterr().out
    assert "study: adds seeds.values ([0] -> [0, 1])" in out and "study: adds values.induced" in out
    assert "study: adds models" in out and "study: adds controls.count (2 -> 3)" in out
    fewer = copy.deepcopy(more)
    fewer["seeds"]["values"] = [1]
    with pytest.raises(InputError, match="seeds.values"):
        claim(root, parse_spec(fewer))  # dropping a seed is not adding work


def test_the_parent_run_follows_the_spec(tmp_path, monkeypatch):
    """MLflow params cannot change: the parent run carries the spec as tags, updated when seeds are added."""
    import mlflow

    from runner.pipeline import Study
    from runner.stages.analyze_mlflow import log_study
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = _spec(tmp_path)
    d["tracking"] = {"uri": f"sqlite:///{tmp_path / 'm.db'}"}
    study = Study(parse_spec(d), base_dir=tmp_path)
    log_study(study.ctx, study.ctx.tracker.parent())
    more = copy.deepcopy(d)
    more["seeds"]["values"] = [0, 1]
    study2 = Study(parse_spec(more), base_dir=tmp_path)
    parent = study2.ctx.tracker.parent()
    log_study(study2.ctx, parent)
    run = mlflow.tracking.MlflowClient(d["tracking"]["uri"]).get_run(parent)
    assert run.data.tags["seeds"] == "0,1" and run.data.tags["spec.train.lr"] == "0.001"
    mlflow.set_tracking_uri(d["tracking"]["uri"])
    assert len(mlflow.search_runs(experiment_names=["smoke"])) == 1
