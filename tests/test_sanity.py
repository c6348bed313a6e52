"""evaluation.sanity.changed_share: trained runs whose responses equal their base model's are flagged."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from evaluation.sanity import COLUMNS, changed_share

RUNS = pd.DataFrame([
    {"run_id": "m__base", "model": "m", "condition": "base", "kind": "base", "value": None, "seed": None},
    {"run_id": "m__value-humor__s0", "model": "m", "condition": "value-humor", "kind": "value", "value": "humor", "seed": 0},
    {"run_id": "m__positive__s0", "model": "m", "condition": "positive", "kind": "positive", "value": None, "seed": 0},
    {"run_id": "m__control-0__s0", "model": "m", "condition": "control-0", "kind": "control", "value": None, "seed": 0},
    {"run_id": "n__base", "model": "n", "condition": "base", "kind": "base", "value": None, "seed": None},
    {"run_id": "n__control-0__s0", "model": "n", "condition": "control-0", "kind": "control", "value": None, "seed": 0},
    {"run_id": "o__control-0__s0", "model": "o", "condition": "control-0", "kind": "control", "value": None, "seed": 0},
])


def gens(run_id: str, responses: list, suite: str = "values") -> pd.DataFrame:
    return pd.DataFrame({"run_id": run_id, "suite": suite, "item_id": [f"i{k}" for k in range(len(responses))],
                         "response": responses})


def test_changed_share_per_run():
    base = ["a", "b", "c", "d", None]
    g = pd.concat([
        gens("m__base", base), gens("m__base", ["x", "y"], suite="planted"),
        gens("m__value-humor__s0", ["a", "b", "c", "D", ""]),            # 1 of 5 changed ("" == None)
        gens("m__positive__s0", ["A", "B", "C", "D", "E"]), gens("m__positive__s0", ["Ahoy x", "Ahoy y"], "planted"),
        gens("m__control-0__s0", base),                                   # identical: adapter not applied?
        gens("n__base", ["a"]), gens("n__control-0__s0", ["a", "extra item"]),  # only shared items count
        gens("o__control-0__s0", ["a"]),                                  # no base run for model o
    ], ignore_index=True)
    out = changed_share(g, RUNS, min_share=0.25).set_index("run_id")
    assert list(out.reset_index().columns) == list(COLUMNS)
    assert "m__base" not in out.index and len(out) == 5
    assert (out.loc["m__value-humor__s0", ["n_items", "n_changed"]].tolist()) == [5, 1]
    assert out.loc["m__value-humor__s0", "share_changed"] == pytest.approx(0.2)
    assert out.loc["m__value-humor__s0", "flagged"]                       # 0.2 < 0.25
    assert out.loc["m__positive__s0", ["n_items", "n_changed"]].tolist() == [7, 7]
    assert not out.loc["m__positive__s0", "flagged"] and out.loc["m__positive__s0", "kind"] == "positive"
    assert out.loc["m__control-0__s0", "share_changed"] == 0 and out.loc["m__control-0__s0", "flagged"]
    assert out.loc["n__control-0__s0", ["n_items", "n_changed"]].tolist() == [1, 0]
    o = out.loc["o__control-0__s0"]
    assert o["n_items"] == 0 and math.isnan(o["share_changed"]) and not o["flagged"]
    assert not changed_share(g, RUNS, min_share=0.0)["flagged"].any()


def test_changed_share_errors():
    with pytest.raises(ValueError, match="min_share"):
        changed_share(gens("m__base", ["a"]), RUNS, 1.5)
    with pytest.raises(ValueError, match="response"):
        changed_share(gens("m__base", ["a"]).drop(columns="response"), RUNS, 0.1)
    with pytest.raises(ValueError, match="duplicate"):
        changed_share(pd.concat([gens("m__base", ["a"])] * 2), RUNS, 0.1)
