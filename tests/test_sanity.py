"""evaluation.sanity: the adapter probe flags trained runs whose log-probs differ from their base
model's no more than a zero adapter's (or the engine precision's floor) allows; runs without a
probe are unchecked, never passed; the changed-string share only describes."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from evaluation.sanity import (ADAPTER_COLUMNS, DTYPE_FLOOR, NOISE_FACTOR, PROBE_COLUMNS, adapter_check,
                               adapter_lines, adapter_verdicts, changed_share, probe_measures, probe_texts,
                               threshold)

RUNS = pd.DataFrame([
    {"run_id": "m__base", "model": "m", "condition": "base", "kind": "base", "value": None, "seed": None},
    {"run_id": "m__value-humor__s0", "model": "m", "condition": "value-humor", "kind": "value", "value": "humor", "seed": 0},
    {"run_id": "m__positive__s0", "model": "m", "condition": "positive", "kind": "positive", "value": None, "seed": 0},
    {"run_id": "m__control-0__s0", "model": "m", "condition": "control-0", "kind": "control", "value": None, "seed": 0},
    {"run_id": "n__base", "model": "n", "condition": "base", "kind": "base", "value": None, "seed": None},
    {"run_id": "n__control-0__s0", "model": "n", "condition": "control-0", "kind": "control", "value": None, "seed": 0},
    {"run_id": "o__control-0__s0", "model": "o", "condition": "control-0", "kind": "control", "value": None, "seed": 0},
])

RNG = np.random.default_rng(0)
BASE = RNG.normal(-2.0, 1.0, 40)  # 4 texts × 10 tokens


def probe(run_id: str, shift: float, zero: float = 0.0, alone: float = 0.0, dtype: str = "bfloat16",
          base=BASE) -> pd.DataFrame:
    """A run's probe rows: its log-probs are the base's moved by ±shift (so mean |diff| = shift),
    the zero adapter's by ±zero, the zero adapter alone's by ±alone."""
    sign = np.where(np.arange(len(base)) % 2, 1.0, -1.0)
    return pd.DataFrame({"run_id": run_id, "suite": "values", "item_id": [f"i{k // 10}" for k in range(len(base))],
                         "token": np.arange(len(base)) % 10, "logprob": base + sign * shift, "base": base,
                         "zero": base + sign * zero, "zero_alone": base - sign * alone, "dtype": dtype})


def gens(run_id: str, responses: list, suite: str = "values") -> pd.DataFrame:
    return pd.DataFrame({"run_id": run_id, "suite": suite, "item_id": [f"i{k}" for k in range(len(responses))],
                         "response": responses})


def test_the_measure_is_the_mean_absolute_per_token_difference_and_its_nulls():
    p = pd.concat([probe("a", 0.3, zero=0.0, alone=0.02), probe("b", 0.01, zero=0.001, alone=0.0, dtype="float32")])
    m = probe_measures(p).set_index("run_id")
    assert list(m.index) == ["a", "b"]
    assert m.loc["a", ["n_texts", "n_tokens"]].tolist() == [4, 40]
    assert m.loc["a", "logprob_diff"] == pytest.approx(0.3) and m.loc["a", "zero_diff"] == 0
    assert m.loc["a", "alone_diff"] == pytest.approx(0.02)
    assert m.loc["a", "threshold"] == pytest.approx(NOISE_FACTOR * 0.02)
    assert m.loc["b", "threshold"] == pytest.approx(NOISE_FACTOR * 0.001)  # the zero adapter's own difference
    # a token missing on any side is left out; a run left without tokens has nothing to measure
    holes = probe("c", 0.3).assign(base=lambda d: np.where(d["token"] == 0, np.nan, d["base"]))
    assert probe_measures(holes)["n_tokens"].item() == 36
    empty = probe_measures(probe("d", 0.3).assign(base=np.nan)).iloc[0]
    assert empty["n_tokens"] == 0 and math.isnan(empty["logprob_diff"]) and math.isnan(empty["threshold"])


def test_threshold_is_the_larger_of_the_scaled_nulls_and_the_precision_floor():
    assert threshold(0.0, 0.0, "float32") == DTYPE_FLOOR["float32"]
    assert threshold(0.0, 0.0, "bfloat16") == DTYPE_FLOOR["bfloat16"] > DTYPE_FLOOR["float32"]
    assert threshold(0.0, 0.029, "bfloat16") == pytest.approx(NOISE_FACTOR * 0.029)  # SmolLM2 bf16's rounding
    assert threshold(0.05, 0.001, "float32") == pytest.approx(NOISE_FACTOR * 0.05)   # a nondeterministic engine
    assert threshold(0.0, 0.0, "auto") == DTYPE_FLOOR["bfloat16"]  # an unknown precision: the highest floor


def test_runs_at_or_below_their_threshold_are_flagged_and_runs_without_a_probe_unchecked():
    p = pd.concat([
        probe("m__value-humor__s0", 0.4, alone=0.029),          # trained: 4.6× the threshold
        probe("m__positive__s0", 0.08, alone=0.029),            # below 3 × 0.029: flagged
        probe("m__control-0__s0", 0.030, alone=0.029),          # an lr≈0 run: what any change of the weights moves
        probe("n__control-0__s0", 0.0, dtype="float32"),        # adapter never applied: exactly the base
        probe("n__base", 0.0),                                  # (probe rows of a base run are ignored)
    ], ignore_index=True)
    g = pd.concat([gens("m__base", ["a", "b"]), gens("m__value-humor__s0", ["a", "B"]),
                   gens("m__positive__s0", ["A", "B"]), gens("m__control-0__s0", ["a", "b"]), gens("n__base", ["x"]),
                   gens("n__control-0__s0", ["y"]), gens("o__control-0__s0", ["z"])], ignore_index=True)
    runs = RUNS
    out = adapter_check(p, g, runs).set_index("run_id")
    assert list(out.reset_index().columns) == list(ADAPTER_COLUMNS)
    assert list(out.index) == ["m__value-humor__s0", "m__positive__s0", "m__control-0__s0", "n__control-0__s0",
                               "o__control-0__s0"]  # every trained run, none of the base runs
    assert out["status"].to_dict() == {"m__value-humor__s0": "passed", "m__positive__s0": "flagged",
                                       "m__control-0__s0": "flagged", "n__control-0__s0": "flagged",
                                       "o__control-0__s0": "unchecked"}
    assert out["flagged"].tolist() == [False, True, True, True, False]
    assert out.loc["n__control-0__s0", "threshold"] == DTYPE_FLOOR["float32"]
    assert out.loc["o__control-0__s0", "n_tokens"] == 0 and math.isnan(out.loc["o__control-0__s0", "logprob_diff"])
    # the changed-string share is there, and flags nothing: the flagged control changed no string,
    # the flagged positive arm changed every one
    assert out.loc["m__positive__s0", "share_changed"] == 1.0 and out.loc["m__control-0__s0", "share_changed"] == 0
    assert out.loc["m__value-humor__s0", ["n_items", "n_changed"]].tolist() == [2, 1]
    # without any probe every trained run is unchecked, never passed
    assert set(adapter_check(None, g, runs)["status"]) == {"unchecked"}


def test_a_run_exactly_at_its_threshold_is_flagged():
    base = np.full(40, -2.0)  # dyadic numbers: every difference below is exact
    at, above = probe("m__value-humor__s0", 0.375, alone=0.125, base=base), probe("m__positive__s0", 0.5, alone=0.125,
                                                                                   base=base)
    out = adapter_check(pd.concat([at, above]), gens("m__base", ["a"]), RUNS[RUNS["model"] == "m"]).set_index("run_id")
    assert out.loc["m__value-humor__s0", "threshold"] == out.loc["m__value-humor__s0", "logprob_diff"] == 0.375
    assert out.loc["m__value-humor__s0", "status"] == "flagged" and out.loc["m__positive__s0", "status"] == "passed"


def test_a_run_whose_base_log_probs_are_missing_is_unchecked():
    p = probe("m__value-humor__s0", 0.4).assign(base=np.nan)
    out = adapter_check(p, gens("m__base", ["a"]), RUNS[RUNS["model"] == "m"]).set_index("run_id")
    assert out.loc["m__value-humor__s0", "status"] == "unchecked"
    assert out.loc["m__positive__s0", "status"] == "unchecked"  # no probe rows at all


def test_verdict_lines_say_flagged_passed_and_unchecked_per_model():
    runs = RUNS[RUNS["model"].isin(["m", "n"])]
    g = gens("m__base", ["a"])
    flagged_all = pd.concat([probe(r, 0.03, alone=0.029) for r in ("m__value-humor__s0", "m__positive__s0",
                                                                    "m__control-0__s0")]
                            + [probe("n__control-0__s0", 0.5, dtype="float32")])
    v = adapter_verdicts(adapter_check(flagged_all, g, runs))
    assert [(x["model"], x["status"]) for x in v] == [("m", "flagged"), ("n", "passed")]
    assert v[0]["line"] == ("m: all 3 trained runs flagged: adapter not applied or not trained (per-token log-prob "
                            "difference from the base 0.03, at or below the threshold 0.087)")
    assert v[1]["line"].startswith("n: every checked trained run's adapter changes its model (per-token log-prob "
                                   "difference from the base 0.5, threshold 0.0001; lowest 5000.0× its threshold)")
    some = pd.concat([probe("m__value-humor__s0", 0.03, alone=0.029), probe("m__positive__s0", 0.4, alone=0.029)])
    lines = adapter_lines(adapter_check(some, g, runs))
    assert lines[0].startswith("m: 1 of 3 trained runs flagged") and lines[0].endswith(": m__value-humor__s0")
    assert lines[1] == ("m: 1 of 3 trained runs unchecked: no adapter probe, so whether their adapters were "
                        "applied is unknown: m__control-0__s0")
    assert lines[2].startswith("n: 1 of 1 trained runs unchecked")
    assert adapter_lines(None) == [] and adapter_lines(adapter_check(None, g, RUNS.iloc[:1])) == []


def test_probe_texts_are_a_seed_determined_sample_of_items_with_a_base_response():
    items = pd.DataFrame({"suite": ["s"] * 6 + ["t"] * 4, "item_id": [f"i{k}" for k in range(10)],
                          "messages": [[{"role": "user", "content": f"q{k}"}] for k in range(10)]})
    responses = items[["suite", "item_id"]].assign(response=[f"r{k}" for k in range(10)])
    responses.loc[[2, 7], "response"] = ["", None]  # nothing to probe with
    a = probe_texts(items, responses, 5, seed=0)
    assert len(a) == 5 and not set(a["item_id"]) & {"i2", "i7"}
    assert list(a.columns) == ["suite", "item_id", "messages", "response"]
    assert a.equals(probe_texts(items.iloc[::-1], responses.iloc[::-1], 5, seed=0))  # order-free
    assert not a.equals(probe_texts(items, responses, 5, seed=1))
    assert len(probe_texts(items, responses, 32, seed=0)) == 8  # all there are
    assert (a["response"] == a["item_id"].str.replace("i", "r")).all()


def test_changed_share_only_describes():
    g = pd.concat([gens("m__base", ["a", "b", "c", "d", None]), gens("m__value-humor__s0", ["a", "b", "c", "D", ""]),
                   gens("n__base", ["a"]), gens("n__control-0__s0", ["a", "extra item"])], ignore_index=True)
    out = changed_share(g, RUNS).set_index("run_id")
    assert list(out.columns) == ["n_items", "n_changed", "share_changed"]
    assert out.loc["m__value-humor__s0"].tolist() == [5, 1, pytest.approx(0.2)]  # "" == None
    assert out.loc["n__control-0__s0", ["n_items", "n_changed"]].tolist() == [1, 0]  # only shared items count
    assert math.isnan(out.loc["o__control-0__s0", "share_changed"])  # no base run for model o


def test_errors():
    with pytest.raises(ValueError, match="response"):
        changed_share(gens("m__base", ["a"]).drop(columns="response"), RUNS)
    with pytest.raises(ValueError, match="duplicate"):
        changed_share(pd.concat([gens("m__base", ["a"])] * 2), RUNS)
    with pytest.raises(ValueError, match="zero_alone"):
        probe_measures(probe("a", 0.1).drop(columns="zero_alone"))
    with pytest.raises(ValueError, match="several dtypes"):
        probe_measures(pd.concat([probe("a", 0.1), probe("a", 0.1, dtype="float32")]))
    assert list(probe_measures(pd.DataFrame(columns=list(PROBE_COLUMNS))).columns)[0] == "run_id"
