"""A unit's lifecycle (runner.stages.unit): every stage's units end done or failed, `valind status`
lists them all (the suite items and the refusal judges' agreement included), and a unit whose
production raised is failed, shown so, and produced again by the next run. Plain objects on the
real store and stage functions; no engine starts (the judges are string matchers)."""
from __future__ import annotations

import pandas as pd
import pytest

from runner.stages import score
from runner.stages.curate import CURATE, Curated
from runner.stages.generate import ITEMS, load_items
from runner.stages.score import AGREEMENT, agreement
from runner.stages.unit import Done, Unit
from runner.store import DONE, FAILED, Store, write_parquet
from test_reliability import _fake_trained, _study


def _states(study, stage: str) -> list[str]:
    return [s["state"] for s in study.status() if s["stage"] == stage]


def _items_and_agreement_study(tmp_path, monkeypatch, data_dir):
    study = _study(tmp_path, monkeypatch, data={"data_dir": str(data_dir)}, generate={"suites": ["safety"]},
                   score={"suites": {"safety": {"judges": ["strmatch", "substring"]}}, "benchmarks": []})
    _fake_trained(study)  # annotate, curate and train done: the runs are known
    held = [[{"role": "user", "content": f"Tell me about {t}."}] for t in ("rain", "bread", "maps", "snow")]
    write_parquet(pd.DataFrame({"prompt": held}), Curated(CURATE.unit(study.ctx)).held_out)  # held-out suites' prompts
    return study


def test_status_lists_the_items_and_agreement_units(tmp_path, monkeypatch, data_dir):
    study = _items_and_agreement_study(tmp_path, monkeypatch, data_dir)
    assert _states(study, "items") == ["missing"] and _states(study, "agreement") == ["missing"]
    items = load_items(study.ctx)
    agree = agreement(study.ctx)
    assert len(items) and set(agree["judge"]) == {"strmatch", "substring"}
    assert _states(study, "items") == ["done"] and _states(study, "agreement") == ["done"]
    rows = {s["stage"]: s for s in study.status()}
    assert rows["items"]["key"] == ITEMS(study.ctx) and rows["agreement"]["key"] == AGREEMENT(study.ctx)


def test_a_unit_whose_production_raises_is_failed_and_produced_again(tmp_path, monkeypatch, data_dir):
    study = _items_and_agreement_study(tmp_path, monkeypatch, data_dir)
    real = score.judge_agreement

    def down(*a, **k):
        raise RuntimeError("the labels are unreadable")
    monkeypatch.setattr(score, "judge_agreement", down)
    with pytest.raises(RuntimeError, match="unreadable"):
        agreement(study.ctx)
    unit = AGREEMENT.unit(study.ctx)
    assert (unit / FAILED).exists() and not (unit / DONE).exists()
    [row] = [s for s in study.status() if s["stage"] == "agreement"]
    assert row["state"] == "failed" and "refusal judge agreement: RuntimeError: the labels are unreadable" in row["why"]

    monkeypatch.setattr(score, "judge_agreement", real)
    agreement(study.ctx)  # the next run produces it again
    assert (unit / DONE).exists() and not (unit / FAILED).exists()
    assert _states(study, "agreement") == ["done"]


def test_a_failed_items_unit_is_listed_and_produced_again(tmp_path, monkeypatch, data_dir):
    study = _items_and_agreement_study(tmp_path, monkeypatch, data_dir)
    with monkeypatch.context() as m:
        m.setattr(study.ctx, "data_dir", tmp_path / "no-such-dir")
        with pytest.raises(Exception):
            load_items(study.ctx)
    assert _states(study, "items") == ["failed"]
    assert len(load_items(study.ctx)) and _states(study, "items") == ["done"]


def test_produce_marks_done_with_inputs_or_failed(tmp_path):
    store = Store(tmp_path)
    up, down = Unit(store, "curate", "k1"), Unit(store, "items", "k2")
    with pytest.raises(Exception, match="its input curate/k1 is not done"):  # an input must be done first
        down.produce("items", lambda: (write_parquet(pd.DataFrame({"a": [1]}), down / "x.parquet"),
                                       Done(inputs=(up,)))[1])
    assert down.failed() is not None and not down.cached()
    up.produce("subsets", lambda: (write_parquet(pd.DataFrame({"a": [1]}), up / "y.parquet"), Done({"n": 1}))[1])
    down.produce("items", lambda: Done(inputs=(up,)))
    assert down.cached() and down.failed() is None and up.info()["n"] == 1
    assert store.info("items", "k2")["inputs"] == {"curate/k1": up.files_hash()}


def test_need_refuses_a_stage_result_of_another_type(tmp_path, monkeypatch, data_dir):
    """`ctx.need(Curated)` checks what the stage returned: a wrong result type is an error, not a silent Any."""
    study = _items_and_agreement_study(tmp_path, monkeypatch, data_dir)
    assert isinstance(study.ctx.need(Curated), Curated)
    monkeypatch.setattr(study.ctx, "_need", lambda stage: object())
    with pytest.raises(TypeError, match="the curate stage returned object, not Curated"):
        study.ctx.need(Curated)
