"""Curation on synthetic annotated pairs: rules, held-out, equal N, length-matched controls."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from runner.data.curate import (CurationError, assign_bins, curate, default_length, is_held_out, plant,
                                planted_ids, proportional_counts)
from runner.spec import ControlsSpec, DataSpec, PositiveControlSpec, SourceSpec

VALS = ["empathy", "honesty", "humor"]
SRC = [SourceSpec(name="hh_rlhf", subset="harmless-base")]


def make(n: int = 600, seed: int = 1, unscored_every: int = 0):
    """Pairs with varied lengths; values drawn so each V is in chosen-not-rejected for ~1/4 of pairs.

    Value-bearing pairs are longer on average, so length matching of controls is not trivial.
    """
    rng = np.random.default_rng(seed)
    pairs, ann = [], []
    for i in range(n):
        pid = f"src/{i:05d}"
        cv = [v for v in VALS if rng.random() < 0.4]
        rv = [v for v in VALS if rng.random() < 0.3]
        words = int(rng.integers(1, 40)) + 15 * len(cv)
        pairs.append({"pair_id": pid, "source": "src", "prompt": [{"role": "user", "content": "q " * 5}],
                      "chosen": "w " * words, "rejected": "r " * int(rng.integers(1, 20)), "n_turns": 1})
        scored = not (unscored_every and i % unscored_every == 0)
        ann.append({"pair_id": pid, "side": "chosen", "values": cv if scored else [], "scored": scored,
                    "raw": ", ".join(cv) or "none"})
        ann.append({"pair_id": pid, "side": "rejected", "values": rv, "scored": True, "raw": ", ".join(rv)})
    return pd.DataFrame(pairs), pd.DataFrame(ann)


def ann_sets(ann: pd.DataFrame) -> dict:
    return {(p, s): set(v) for p, s, v in zip(ann["pair_id"], ann["side"], ann["values"])}


def test_rule_chosen_not_rejected():
    pairs, ann = make()
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC), ControlsSpec(count=1))
    sets = ann_sets(ann)
    for v in VALS:
        sub = cur.subsets[f"value-{v}"]
        assert all(v in sets[(p, "chosen")] and v not in sets[(p, "rejected")] for p in sub["pair_id"])
        assert (sub["condition"] == f"value-{v}").all()
    assert set(cur.subsets) == {"value-empathy", "value-honesty", "value-humor", "control-0"}
    assert cur.rule["rule"] == "chosen_not_rejected" and cur.rule["N"] == len(cur.subsets["value-humor"])


def test_rule_chosen_admits_rejected_with_value():
    pairs, ann = make()
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC, rule="chosen"), ControlsSpec(count=0))
    sets = ann_sets(ann)
    both = 0
    for v in VALS:
        for p in cur.subsets[f"value-{v}"]["pair_id"]:
            assert v in sets[(p, "chosen")]
            both += v in sets[(p, "rejected")]
    assert both > 0
    strict = curate(pairs, ann, VALS, DataSpec(sources=SRC), ControlsSpec(count=0))
    assert (cur.table["available"] > strict.table["available"]).all()
    row = cur.table.set_index("value").loc["empathy"]
    assert row["available"] == row["chosen_with"]


def test_held_out_never_in_subsets_and_stable():
    pairs, ann = make()
    data = DataSpec(sources=SRC, held_out_fraction=0.2, seed=3)
    cur = curate(pairs, ann, VALS, data, ControlsSpec(count=3))
    held = set(cur.held_out["pair_id"])
    assert 0.12 < len(held) / len(pairs) < 0.28
    for name, sub in cur.subsets.items():
        assert not held & set(sub["pair_id"]), name
    # membership depends on the pair alone: curating a subset of the pairs keeps the same held-out pairs
    part = pairs.iloc[:300]
    cur2 = curate(part, ann, VALS, data, ControlsSpec(count=0))
    assert set(cur2.held_out["pair_id"]) == held & set(part["pair_id"])
    assert held == {p for p in pairs["pair_id"] if is_held_out(p, 0.2, 3)}
    other_seed = curate(pairs, ann, VALS, DataSpec(sources=SRC, held_out_fraction=0.2, seed=4), ControlsSpec(count=0))
    assert set(other_seed.held_out["pair_id"]) != held


def test_equal_n_and_subset_size():
    pairs, ann = make()
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC), ControlsSpec(count=2))
    sizes = {k: len(v) for k, v in cur.subsets.items()}
    n = min(cur.table["available"])
    assert set(sizes.values()) == {n} and (cur.table["used"] == n).all() and (cur.table["N"] == n).all()
    assert all(s["pair_id"].is_unique for s in cur.subsets.values())
    fixed = curate(pairs, ann, VALS, DataSpec(sources=SRC, subset_size=40), ControlsSpec(count=2))
    assert {len(v) for v in fixed.subsets.values()} == {40}


def test_subset_size_too_large_lists_counts():
    pairs, ann = make()
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC), ControlsSpec(count=0))
    counts = dict(zip(cur.table["value"], cur.table["available"]))
    with pytest.raises(CurationError) as e:
        curate(pairs, ann, VALS, DataSpec(sources=SRC, subset_size=max(counts.values())), ControlsSpec(count=0))
    for v, c in counts.items():
        assert f"{v}={c}" in str(e.value)


def test_below_min_subset_size_lists_counts():
    pairs, ann = make(n=40)
    with pytest.raises(CurationError) as e:
        curate(pairs, ann, VALS + ["privacy"], DataSpec(sources=SRC, min_subset_size=4), ControlsSpec())
    msg = str(e.value)
    assert "min_subset_size=4" in msg and "privacy=0" in msg
    assert all(f"{v}=" in msg for v in VALS)


def test_unscored_excluded_from_values_but_in_control_pool():
    pairs, ann = make(unscored_every=3)
    unscored = set(pairs["pair_id"].iloc[::3])
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC, held_out_fraction=0.0), ControlsSpec(count=4))
    for v in VALS:
        assert not unscored & set(cur.subsets[f"value-{v}"]["pair_id"])
    in_controls = set().union(*[set(cur.subsets[f"control-{k}"]["pair_id"]) for k in range(4)])
    assert unscored & in_controls
    assert cur.stats["unscored"] == len(unscored) and cur.stats["eligible"] == len(pairs) - len(unscored)
    # a pair whose annotation is missing altogether is also ineligible
    ann2 = ann[~((ann["pair_id"] == "src/00001") & (ann["side"] == "rejected"))]
    cur2 = curate(pairs, ann2, VALS, DataSpec(sources=SRC, held_out_fraction=0.0), ControlsSpec(count=0))
    assert cur2.stats["unannotated"] == 1


def test_controls_same_n_and_length_matched_per_bin():
    pairs, ann = make(n=1500)
    controls = ControlsSpec(count=3, length_bins=4)
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC), controls)
    n = cur.rule["N"]
    edges = np.array(cur.rule["controls"]["edges"])
    assert len(edges) == 3
    pooled = np.concatenate([cur.subsets[f"value-{v}"]["length"].to_numpy() for v in VALS])
    target = proportional_counts(np.bincount(assign_bins(pooled, edges), minlength=4), n)
    lengths = {r["pair_id"]: default_length(r) for r in pairs.to_dict("records")}
    ids = []
    for k in range(3):
        sub = cur.subsets[f"control-{k}"]
        assert len(sub) == n and sub["pair_id"].is_unique
        got = np.bincount(assign_bins([lengths[p] for p in sub["pair_id"]], edges), minlength=4)
        assert got.tolist() == target.tolist()
        ids.append(set(sub["pair_id"]))
    assert ids[0] != ids[1] != ids[2]  # each control has its own seed
    bins = cur.control_bins
    assert (bins["drawn"] == bins["target"]).all() and (bins["filled_at_random"] == 0).all()
    # without matching, a uniform draw would be shorter: value-bearing pairs are longer by construction
    assert np.median(pooled) > np.median(list(lengths.values()))


def test_controls_custom_length_fn():
    pairs, ann = make(n=300)
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC), ControlsSpec(count=1, length_bins=2),
                 length_fn=lambda p: len(p["chosen"]))
    sub = cur.subsets["control-0"]
    assert len(sub) == cur.rule["N"]
    assert (sub["length"] == sub["chosen"].str.len()).all()
    assert cur.control_bins["drawn"].sum() == cur.rule["N"]


def test_deterministic_and_order_independent():
    pairs, ann = make()
    data, controls = DataSpec(sources=SRC, seed=7), ControlsSpec(count=2)
    a = curate(pairs, ann, VALS, data, controls)
    b = curate(pairs.sample(frac=1.0, random_state=0), ann.sample(frac=1.0, random_state=1), VALS, data, controls)
    assert a.subsets.keys() == b.subsets.keys()
    for k in a.subsets:
        pd.testing.assert_frame_equal(a.subsets[k], b.subsets[k])
    pd.testing.assert_frame_equal(a.table, b.table)
    assert a.rule == b.rule and a.examples == b.examples
    c = curate(pairs, ann, VALS, DataSpec(sources=SRC, seed=8), controls)
    assert set(c.subsets["value-empathy"]["pair_id"]) != set(a.subsets["value-empathy"]["pair_id"])


def test_overlap_and_examples():
    pairs, ann = make()
    cur = curate(pairs, ann, VALS, DataSpec(sources=SRC), ControlsSpec(count=1))
    assert len(cur.overlap) == 3
    row = cur.overlap.iloc[0]
    a = set(cur.subsets[f"value-{row['value_a']}"]["pair_id"])
    b = set(cur.subsets[f"value-{row['value_b']}"]["pair_id"])
    assert row["intersection"] == len(a & b) and row["jaccard"] == pytest.approx(len(a & b) / len(a | b))
    for v in VALS:
        ex = cur.examples[v]
        assert 1 <= len(ex) <= 3 and all(v in e["chosen_values"] for e in ex)


def test_bad_annotations_rejected():
    pairs, ann = make(n=50)
    with pytest.raises(CurationError, match="duplicate"):
        curate(pairs, pd.concat([ann, ann.iloc[:1]]), VALS, DataSpec(sources=SRC), ControlsSpec())
    bad = ann.copy()
    bad.loc[0, "side"] = "both"
    with pytest.raises(CurationError, match="side"):
        curate(pairs, bad, VALS, DataSpec(sources=SRC), ControlsSpec())


# ------------------------------------------------------------------ positive control

def test_plant_and_planted_ids():
    assert plant("  Sure, here it is. ", "Ahoy there!") == "Ahoy there! Sure, here it is. "
    assert plant(" Sure. \n", "Ahoy there!", "end") == " Sure. Ahoy there!"
    with pytest.raises(ValueError):
        plant("x", "Ahoy", "middle")
    ids = [f"p{i}" for i in range(20)]
    half = planted_ids(ids, 0.5, seed=0)
    assert len(half) == 10 and half <= set(ids)
    assert planted_ids(list(reversed(ids)), 0.5, seed=0) == half   # order does not matter
    assert planted_ids(ids, 0.5, seed=1) != half
    assert planted_ids(ids, 1.0, 0) == set(ids) and len(planted_ids(ids, 0.01, 0)) == 1  # at least one
    assert planted_ids(ids, 0.25, 0) <= planted_ids(ids, 0.5, 0)  # a larger share adds pairs


def test_positive_control_subset():
    pairs, ann = make()
    data = DataSpec(sources=SRC, subset_size=40, held_out_fraction=0.2)
    plain = curate(pairs, ann, VALS, data, ControlsSpec(count=2))
    pos = PositiveControlSpec()
    cur = curate(pairs, ann, VALS, data, ControlsSpec(count=2, positive=pos))
    assert list(cur.subsets) == ["value-empathy", "value-honesty", "value-humor", "positive", "control-0", "control-1"]
    # adding the arm changes no other subset
    for k, sub in plain.subsets.items():
        pd.testing.assert_frame_equal(sub, cur.subsets[k])
    sub = cur.subsets["positive"]
    assert len(sub) == 40 and sub["pair_id"].is_unique and (sub["condition"] == "positive").all()
    assert not set(sub["pair_id"]) & set(cur.held_out["pair_id"])      # drawn from the training pool
    assert set(sub["pair_id"]) != set(cur.subsets["control-0"]["pair_id"])  # its own seed
    orig = pairs.set_index("pair_id")
    assert sub["planted"].all()
    for r in sub.itertuples():  # a minimal pair: the phrase is the only difference
        assert r.rejected == orig.loc[r.pair_id, "chosen"]
        assert r.chosen == "Ahoy there! " + orig.loc[r.pair_id, "chosen"].lstrip()
        assert r.prompt == orig.loc[r.pair_id, "prompt"]
    assert (sub["length"] == [default_length(r) for r in sub.to_dict("records")]).all()
    # recorded in the table, the rule and the stats
    row = cur.table.set_index("value").loc["positive"]
    assert (row["N"], row["used"], row["planted"], row["phrase"]) == (40, 40, 40, "Ahoy there!")
    assert (cur.table.set_index("value").loc[VALS, "planted"] == 0).all()
    assert cur.rule["positive"]["planted"] == 40 and cur.rule["positive"]["phrase"] == "Ahoy there!"
    assert cur.stats["planted"] == 40 and "planted" not in plain.stats and "planted" not in plain.table
    assert set(cur.control_bins["condition"]) == {"control-0", "control-1", "positive"}
    assert cur.examples["positive"] and all(e["chosen"].startswith("Ahoy there!") for e in cur.examples["positive"])


def test_positive_control_fraction_end_and_determinism():
    pairs, ann = make()
    data = DataSpec(sources=SRC, subset_size=40, seed=5)
    controls = ControlsSpec(count=0, positive=PositiveControlSpec(phrase="Arr matey!", position="end", fraction=0.25))
    a = curate(pairs, ann, VALS, data, controls)
    b = curate(pairs.sample(frac=1.0, random_state=0), ann.sample(frac=1.0, random_state=1), VALS, data, controls)
    pd.testing.assert_frame_equal(a.subsets["positive"], b.subsets["positive"])
    sub = a.subsets["positive"]
    assert sub["planted"].sum() == 10 and a.stats["planted"] == 10
    orig = pairs.set_index("pair_id")
    for r in sub.itertuples():
        if r.planted:
            assert r.rejected == orig.loc[r.pair_id, "chosen"]
            assert r.chosen == orig.loc[r.pair_id, "chosen"].rstrip() + " Arr matey!"
        else:  # the other pairs stay as they were
            assert (r.chosen, r.rejected) == (orig.loc[r.pair_id, "chosen"], orig.loc[r.pair_id, "rejected"])
    other = curate(pairs, ann, VALS, DataSpec(sources=SRC, subset_size=40, seed=6), controls)
    assert set(other.subsets["positive"]["pair_id"]) != set(sub["pair_id"])

