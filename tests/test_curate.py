"""Curation on synthetic annotated pairs: rules, held-out, equal N, length-matched controls."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from runner.data.curate import (CurationError, assign_bins, curate, default_length, is_held_out, plant,
                                planted_ids, proportional_counts)
from runner.data.matching import condition_table, mismatches
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



# ------------------------------------------------------------------ the paper's rule and subset_size: all

PER_VALUE = ControlsSpec(count=0, match="per_value")


def make_sides(cases: dict[str, int], value: str = "empathy", n_other: int = 0):
    """Pairs whose `value` is on the chosen side only, the rejected only, both or neither, `cases[...]`
    of each; every pair also has honesty on its chosen side (another value's subset)."""
    pairs, ann, i = [], [], 0
    for case, k in cases.items():
        for _ in range(k):
            pid = f"p/{i:04d}"
            cv = ["honesty"] + ([value] if case in ("chosen", "both") else [])
            rv = [value] if case in ("rejected", "both") else []
            pairs.append({"pair_id": pid, "source": "p", "prompt": [{"role": "user", "content": f"q{i}"}],
                          "chosen": f"good {i} " * (1 + i % 7), "rejected": f"bad {i}", "n_turns": 1})
            ann += [{"pair_id": pid, "side": "chosen", "values": cv, "scored": True, "raw": ""},
                    {"pair_id": pid, "side": "rejected", "values": rv, "scored": True, "raw": ""}]
            i += 1
    return pd.DataFrame(pairs), pd.DataFrame(ann)


def test_flip_rule_counts_and_swaps_only_in_its_subset():
    pairs, ann = make_sides({"chosen": 10, "rejected": 8, "both": 5, "neither": 7})
    before = pairs.copy()
    data = DataSpec(sources=SRC, rule="exactly_one_side_flip", subset_size="all", held_out_fraction=0.0)
    cur = curate(pairs, ann, ["empathy", "honesty"], data, PER_VALUE)
    row = cur.table.set_index("value").loc["empathy"]
    assert (row["kept_as_is"], row["flipped"], row["dropped_both_sides"], row["dropped_neither_side"],
            row["dropped_rejected_only"], row["available"], row["flipped_used"]) == (10, 8, 5, 7, 0, 18, 8)
    assert cur.rule["counts"]["empathy"] == {"kept_as_is": 10, "flipped": 8, "dropped_both_sides": 5,
                                             "dropped_rejected_only": 0, "dropped_neither_side": 7}
    sub = cur.subsets["value-empathy"]
    orig = pairs.set_index("pair_id")
    sides = ann_sets(ann)
    assert len(sub) == 18 and sub["flipped"].sum() == 8
    for r in sub.itertuples():
        o = orig.loc[r.pair_id]
        if "empathy" in sides[(r.pair_id, "rejected")]:   # only on the rejected side: swapped
            assert r.flipped and (r.chosen, r.rejected) == (o["rejected"], o["chosen"])
        else:
            assert not r.flipped and (r.chosen, r.rejected) == (o["chosen"], o["rejected"])
    # the swap is the empathy subset's alone: the input table and honesty's subset keep every pair as it was
    pd.testing.assert_frame_equal(pairs, before)
    hon = cur.subsets["value-honesty"].set_index("pair_id")
    assert len(hon) == 30 and not hon["flipped"].any()
    assert (hon["chosen"] == orig.loc[hon.index, "chosen"]).all()
    flipped_ex = [e for e in cur.examples["empathy"] if e["flipped"]]
    assert all("empathy" in e["chosen_values"] and "empathy" not in e["rejected_values"] for e in flipped_ex)
    # the same pairs under the other rules: every eligible pair is counted once
    for rule, expect in {"chosen_not_rejected": (10, 0, 5, 7, 8), "chosen": (15, 0, 0, 7, 8)}.items():
        r = curate(pairs, ann, ["empathy", "honesty"], DataSpec(sources=SRC, rule=rule, subset_size="all",
                                                                held_out_fraction=0.0), PER_VALUE)
        row = r.table.set_index("value").loc["empathy"]
        assert (row["kept_as_is"], row["flipped"], row["dropped_both_sides"], row["dropped_neither_side"],
                row["dropped_rejected_only"]) == expect, rule
        assert not r.subsets["value-empathy"]["flipped"].any()


def test_flip_rule_with_equal_n():
    pairs, ann = make_sides({"chosen": 10, "rejected": 8, "both": 5, "neither": 7})
    cur = curate(pairs, ann, ["empathy", "honesty"], DataSpec(sources=SRC, rule="exactly_one_side_flip",
                                                              held_out_fraction=0.0), ControlsSpec(count=1))
    sub = cur.subsets["value-empathy"]
    assert cur.rule["N"] == 18 == len(sub) == len(cur.subsets["value-honesty"]) == len(cur.subsets["control-0"])
    assert cur.table.set_index("value").loc["empathy", "flipped_used"] == sub["flipped"].sum() == 8


def make_profiles(n_rest: int = 700):
    """humor rides on long chosen responses (60–120 words), empathy on short ones (1–8): their length
    profiles differ from each other and from the pool, and their sizes differ (200 against 90)."""
    rng = np.random.default_rng(0)
    pairs, ann = [], []
    for i in range(290 + n_rest):
        value, words = ("humor", rng.integers(60, 120)) if i < 200 else \
            ("empathy", rng.integers(1, 8)) if i < 290 else (None, rng.integers(1, 60))
        pid = f"q/{i:05d}"
        pairs.append({"pair_id": pid, "source": "q", "prompt": [{"role": "user", "content": "hi"}],
                      "chosen": "w " * int(words), "rejected": "r", "n_turns": 1})
        ann += [{"pair_id": pid, "side": "chosen", "values": [value] if value else [], "scored": True, "raw": ""},
                {"pair_id": pid, "side": "rejected", "values": [], "scored": True, "raw": ""}]
    return pd.DataFrame(pairs), pd.DataFrame(ann)


def test_all_gives_unequal_sizes_and_per_value_controls_of_matching_size_and_profile():
    pairs, ann = make_profiles()
    controls = ControlsSpec(count=2, length_bins=4, match="per_value")
    data = DataSpec(sources=SRC, subset_size="all", held_out_fraction=0.1)
    cur = curate(pairs, ann, ["humor", "empathy"], data, controls)
    sizes = {v: len(cur.subsets[f"value-{v}"]) for v in ("humor", "empathy")}
    assert sizes == cur.rule["sizes"] == cur.rule["available"] and sizes["humor"] > sizes["empathy"] > 60
    assert cur.rule["N"] is None and cur.rule["kept"] == ["humor", "empathy"] and cur.rule["dropped"] == {}
    assert set(cur.subsets) == {"value-humor", "value-empathy", "control-humor-0", "control-humor-1",
                                "control-empathy-0", "control-empathy-1"}
    lengths = {r["pair_id"]: default_length(r) for r in pairs.to_dict("records")}
    held = set(cur.held_out["pair_id"])
    for v in ("humor", "empathy"):
        own = cur.subsets[f"value-{v}"]["length"].to_numpy()
        edges = np.array(cur.rule["controls"]["per_value"][v]["sources"]["q"]["edges"])  # one source: "q"
        assert len(edges) == 3
        target = proportional_counts(np.bincount(assign_bins(own, edges), minlength=4), sizes[v])
        for k in range(2):
            sub = cur.subsets[f"control-{v}-{k}"]
            assert len(sub) == sizes[v] and sub["pair_id"].is_unique and not held & set(sub["pair_id"])
            got = np.bincount(assign_bins([lengths[p] for p in sub["pair_id"]], edges), minlength=4)
            assert got.tolist() == target.tolist(), (v, k)
        assert set(cur.subsets[f"control-{v}-0"]["pair_id"]) != set(cur.subsets[f"control-{v}-1"]["pair_id"])
    bins = cur.control_bins
    assert (bins["drawn"] == bins["target"]).all() and set(bins["condition"]) == set(cur.subsets) - {
        "value-humor", "value-empathy"}
    # each value's controls follow its own profile, not a pooled one
    med = {c: np.median(cur.subsets[c]["length"]) for c in cur.subsets}
    assert med["control-humor-0"] > 2 * med["control-empathy-0"]
    assert abs(med["control-humor-0"] - med["value-humor"]) < 0.2 * med["value-humor"]
    # deterministic and independent of row order
    again = curate(pairs.sample(frac=1.0, random_state=3), ann, ["humor", "empathy"], data, controls)
    for k in cur.subsets:
        pd.testing.assert_frame_equal(cur.subsets[k], again.subsets[k])


def test_per_value_controls_with_equal_n():
    pairs, ann = make_profiles()
    cur = curate(pairs, ann, ["humor", "empathy"], DataSpec(sources=SRC, subset_size=50),
                 ControlsSpec(count=1, match="per_value"))
    assert {len(s) for s in cur.subsets.values()} == {50}
    assert set(cur.subsets) == {"value-humor", "value-empathy", "control-humor-0", "control-empathy-0"}
    med = {c: np.median(cur.subsets[c]["length"]) for c in ("control-humor-0", "control-empathy-0")}
    assert med["control-humor-0"] > 2 * med["control-empathy-0"]


def test_all_drops_values_below_min_subset_size():
    pairs, ann = make_profiles()
    data = DataSpec(sources=SRC, subset_size="all", min_subset_size=100, held_out_fraction=0.0)
    cur = curate(pairs, ann, ["humor", "empathy", "privacy"], data, ControlsSpec(count=1, match="per_value"))
    assert cur.rule["kept"] == ["humor"] and cur.rule["dropped"] == {"empathy": 90, "privacy": 0}
    assert "min_subset_size=100" in cur.rule["dropped_why"]
    assert set(cur.subsets) == {"value-humor", "control-humor-0"}
    t = cur.table.set_index("value")
    assert t["kept"].to_dict() == {"humor": True, "empathy": False, "privacy": False}
    assert (t.loc["empathy", "available"], t.loc["empathy", "used"]) == (90, 0)
    assert set(cur.examples) == {"humor"} and len(cur.overlap) == 0
    with pytest.raises(CurationError, match="every value has fewer eligible pairs than min_subset_size=300"):
        curate(pairs, ann, ["humor", "empathy"], data.model_copy(update={"min_subset_size": 300}),
               ControlsSpec(count=1, match="per_value"))
    # equal N still refuses what it cannot fill
    with pytest.raises(CurationError, match="below min_subset_size=100"):
        curate(pairs, ann, ["humor", "empathy"], data.model_copy(update={"subset_size": None}), ControlsSpec())


def test_all_needs_per_value_controls_and_sizes_the_positive_arm_at_the_median():
    pairs, ann = make_profiles(n_rest=10)
    with pytest.raises(CurationError, match="controls.match: per_value"):
        curate(pairs, ann, ["humor"], DataSpec(sources=SRC, subset_size="all"), ControlsSpec(count=1))
    # the paper's design with a positive arm: its size is the median kept value size (200 and 90 → 145)
    pairs, ann = make_profiles()
    cur = curate(pairs, ann, ["humor", "empathy"], DataSpec(sources=SRC, subset_size="all", held_out_fraction=0.0),
                 ControlsSpec(count=1, match="per_value", positive=PositiveControlSpec()))
    assert cur.rule["sizes"] == {"humor": 200, "empathy": 90}
    pos = cur.subsets["positive"]
    assert len(pos) == cur.rule["positive"]["N"] == 145 == cur.stats["planted"] and pos["pair_id"].is_unique
    assert "median kept value size" in cur.rule["positive"]["size"]
    assert cur.table.set_index("value").loc["positive", "N"] == 145
    assert cur.conditions.set_index("condition").loc["positive", "pairs"] == 145


# ------------------------------------------------------------------ matched controls: sources and flips

def make_mixed(n_rest: int = 500):
    """Two sources of different length profiles: empathy mostly from "pku" (long, 50 of 120 pairs only on
    the rejected side, flipped by the paper's rule) and some from "hh" (short, 5 of 40 flipped); honesty
    from "hh" only; the rest of the pool half each, without values."""
    rng = np.random.default_rng(4)
    pairs, ann = [], []
    spec = ([("pku", "empathy", "chosen", 40, 80)] * 70 + [("pku", "empathy", "rejected", 40, 80)] * 50
            + [("hh", "empathy", "chosen", 2, 10)] * 35 + [("hh", "empathy", "rejected", 2, 10)] * 5
            + [("hh", "honesty", "chosen", 5, 30)] * 60
            + [("pku" if i % 2 else "hh", None, None, 1, 90) for i in range(n_rest)])
    for i, (src, value, side, lo, hi) in enumerate(spec):
        pid = f"{src}/{i:05d}"
        pairs.append({"pair_id": pid, "source": src, "prompt": [{"role": "user", "content": f"q{i}"}],
                      "chosen": f"good{i} " * int(rng.integers(lo, hi)), "rejected": f"bad{i}", "n_turns": 1})
        ann += [{"pair_id": pid, "side": sd, "values": [value] if side == sd else [], "scored": True, "raw": ""}
                for sd in ("chosen", "rejected")]
    return pd.DataFrame(pairs), pd.DataFrame(ann)


MIXED = DataSpec(sources=SRC, subset_size="all", rule="exactly_one_side_flip", held_out_fraction=0.1)


def test_matched_controls_carry_the_values_sources_and_flips():
    pairs, ann = make_mixed()
    cur = curate(pairs, ann, ["empathy", "honesty"], MIXED, ControlsSpec(count=2, match="per_value"))
    orig = pairs.set_index("pair_id")
    for v in ("empathy", "honesty"):
        own = cur.subsets[f"value-{v}"]
        for k in range(2):
            c = cur.subsets[f"control-{v}-{k}"]
            assert len(c) == len(own) and c["pair_id"].is_unique
            assert c["source"].value_counts().to_dict() == own["source"].value_counts().to_dict()
            assert (c[c["flipped"]]["source"].value_counts().to_dict()
                    == own[own["flipped"]]["source"].value_counts().to_dict())
            o = orig.loc[c["pair_id"]]
            swapped = c["flipped"].to_numpy()
            assert (c["chosen"].to_numpy() == np.where(swapped, o["rejected"], o["chosen"])).all()
            assert (c["rejected"].to_numpy() == np.where(swapped, o["chosen"], o["rejected"])).all()
            for src in set(own["source"]):  # length-matched within each source
                a, b = own[own["source"] == src]["length"], c[c["source"] == src]["length"]
                assert abs(a.median() - b.median()) <= 0.25 * a.median(), (v, k, src)
    e = cur.subsets["value-empathy"]
    assert e["flipped"].sum() == cur.rule["counts"]["empathy"]["flipped"] > 40  # pku's and hh's flips, held out less
    assert not cur.subsets["value-honesty"]["flipped"].any() and not cur.subsets["control-honesty-0"]["flipped"].any()
    assert set(cur.subsets["control-empathy-0"]["pair_id"]) != set(cur.subsets["control-empathy-1"]["pair_id"])
    pv = cur.rule["controls"]["per_value"]["empathy"]
    assert pv["flipped"] == e["flipped"].sum() and pv["flip_share"] == pytest.approx(e["flipped"].mean())
    assert {s: a["N"] for s, a in pv["sources"].items()} == e["source"].value_counts().to_dict()
    assert "source" in cur.control_bins.columns and (cur.control_bins["drawn"] == cur.control_bins["target"]).all()
    # the table: each value beside its controls, with equal sizes, source mixes and flip shares
    t = cur.conditions
    assert t["condition"].tolist() == ["value-empathy", "control-empathy-0", "control-empathy-1",
                                       "value-honesty", "control-honesty-0", "control-honesty-1"]
    for v, g in t.groupby("matches"):
        assert g["pairs"].nunique() == g["sources"].nunique() == g["flip_share"].nunique() == 1, v
    assert t.set_index("condition").loc["value-empathy", "flip_share"] > 0.3
    # deterministic and independent of row order
    again = curate(pairs.sample(frac=1.0, random_state=5), ann, ["empathy", "honesty"], MIXED,
                   ControlsSpec(count=2, match="per_value"))
    for name in cur.subsets:
        pd.testing.assert_frame_equal(cur.subsets[name], again.subsets[name])


def test_a_control_drawn_without_its_values_sources_or_flips_is_refused(monkeypatch):
    """The safety net: a matched control drawn from the whole pool, or left unflipped, differs from its
    value, and curation says so rather than returning it."""
    import runner.data.curate as curate_mod
    import runner.data.draws as draws

    pairs, ann = make_mixed()
    controls = ControlsSpec(count=1, match="per_value")
    with monkeypatch.context() as m:  # ignore the source: draw each stratum from the whole pool
        m.setattr(draws, "_source_pool", lambda pool_idx, sources, source: pool_idx)
        with pytest.raises(CurationError, match=r"control-empathy-0: sources"):
            curate(pairs, ann, ["empathy"], MIXED, controls)
    real = draws.draw_controls
    with monkeypatch.context() as m:  # forget the flips: controls keep their original labels
        m.setattr(curate_mod, "draw_controls", lambda *a, **kw: real(*a, **{**kw, "flips": None}))
        with pytest.raises(CurationError, match=r"control-empathy-0: flipped pairs per source"):
            curate(pairs, ann, ["empathy"], MIXED, controls)
    curate(pairs, ann, ["empathy"], MIXED, controls)  # as drawn: accepted


def test_condition_table_and_mismatches_on_plain_frames():
    def frame(cond, sources, flipped=None, lengths=None):
        f = pd.DataFrame({"pair_id": [f"{cond}{i}" for i in range(len(sources))], "source": sources,
                          "length": lengths or list(range(1, len(sources) + 1))})
        return f.assign(flipped=flipped) if flipped is not None else f
    subsets = {"control-0": frame("c", ["a", "b"]),
               "value-x": frame("v", ["a", "a", "b"], [True, False, False], [10, 20, 30]),
               "control-x-0": frame("m", ["a", "a", "b"], [False, True, False], [12, 18, 40]),
               "positive": frame("p", ["b", "b"])}
    t = condition_table(subsets)
    assert t["condition"].tolist() == ["value-x", "control-x-0", "positive", "control-0"]
    row = t.set_index("condition").loc["value-x"]
    assert (row["sources"], row["flipped"], row["flip_share"], row["length_median"], row["length_q1"]) == \
        ("a 2, b 1", 1, pytest.approx(1 / 3), 20.0, 15.0)
    assert pd.isna(t.set_index("condition").loc["control-0", "flip_share"])
    assert mismatches(subsets) == []
    bad = {**subsets, "control-x-0": frame("m", ["a", "b", "b"], [False, False, True])}
    problems = mismatches(bad)
    assert len(problems) == 2 and "flipped pairs per source" in problems[0] and "sources" in problems[1]
    assert mismatches({**subsets, "control-x-0": frame("m", ["a", "a"], [True, False])}) == \
        ["control-x-0: 2 pairs, value-x has 3", "control-x-0: sources {'a': 2}, value-x has {'a': 2, 'b': 1}"]
    assert mismatches({"control-y-0": frame("m", ["a"])}) == ["control-y-0: no subset value-y to match"]
