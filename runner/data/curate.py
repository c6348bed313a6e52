"""Curation: from annotated preference pairs to value subsets (equal-size, or every eligible pair
under data.subset_size: all), length-matched random controls and a held-out split. Pure and
deterministic: same inputs and spec → identical subsets.

Conditions are named like `Spec.conditions()`: "value-<v>" per induced value, "control-<k>" (pooled
controls) or "control-<v>-<k>" (controls.match: per_value: matched controls that carry what their
value subset carries: size, source mix, flip share, length profile per source), and "positive"
(controls.positive: a control-like draw in which a share of pairs carry a planted phrase).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from runner.data.draws import (CurationError, Draws, assign_bins, bin_edges, derived_seed,  # noqa: F401
                               draw_controls, proportional_counts, stable_unit)
from runner.data.matching import condition_table, mismatches
from runner.data.sources import prompt_text
from runner.spec_sections import ControlsSpec, DataSpec, PositiveControlSpec

ANNOTATION_COLUMNS = ("pair_id", "side", "values", "scored", "raw")
RULES = {
    "chosen_not_rejected": "V is among the chosen response's values and not among the rejected one's",
    "chosen": "V is among the chosen response's values (the rejected side is not consulted)",
    "exactly_one_side_flip": "V is among the values of exactly one response; where it is only among the "
                             "rejected one's, chosen and rejected are swapped in V's subset (the protocol "
                             "preset's rule: our choice, found in no public source)",
}
N_EXAMPLES = 3
# Enters the curate stage's key (runner.stages.curate): bump when the same spec curates other subsets.
# matched-controls-1: per_value controls matched on source mix and flip share; a positive arm under
# data.subset_size: all (the median kept value size).
CURATE_VERSION = "matched-controls-1"


@dataclass
class Curation:
    """Subsets keyed by condition name, the held-out pairs, and the audit tables."""
    subsets: dict[str, pd.DataFrame]
    held_out: pd.DataFrame
    table: pd.DataFrame                 # per value: counts available/used, kept/flipped/dropped, overlaps
    overlap: pd.DataFrame               # pairwise Jaccard between value subsets
    examples: dict[str, list[dict]]     # a few pairs per value subset
    rule: dict[str, Any]                # rule, thresholds, sizes, kept/dropped values, seeds
    stats: dict[str, int] = field(default_factory=dict)        # pool accounting
    control_bins: pd.DataFrame = field(default_factory=pd.DataFrame)  # per control × bin: target/drawn
    conditions: pd.DataFrame = field(default_factory=pd.DataFrame)    # runner.data.matching.condition_table


def default_length(pair: dict) -> int:
    """Whitespace token count of the prompt text, the chosen and the rejected response."""
    return len(prompt_text(pair["prompt"]).split()) + len(pair["chosen"].split()) + len(pair["rejected"].split())


def is_held_out(pair_id: str, fraction: float, seed: int) -> bool:
    """Held-out membership depends only on (pair_id, seed): adding or removing other pairs never
    moves a pair in or out, so the held-out set is stable across `max_pairs` changes."""
    return stable_unit("held-out", seed, pair_id) < fraction


def rule_masks(rule: str, has_c: np.ndarray, has_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(taken, flipped) over pairs for a value found on the chosen (`has_c`) and rejected (`has_r`)
    side: which pairs enter its subset, and which of those enter with chosen and rejected swapped."""
    if rule == "chosen_not_rejected":
        return has_c & ~has_r, np.zeros_like(has_c)
    if rule == "chosen":
        return has_c.copy(), np.zeros_like(has_c)
    if rule == "exactly_one_side_flip":
        return has_c ^ has_r, has_r & ~has_c
    raise CurationError(f"unknown rule {rule!r}; known: {sorted(RULES)}")


def curate(pairs: pd.DataFrame, annotations: pd.DataFrame, induced: list[str], data: DataSpec,
           controls: ControlsSpec, length_fn: Callable[[dict], int] | None = None) -> Curation:
    """Build value subsets, controls and the held-out split.

    Eligibility: a pair enters value subsets only if both sides are annotated and scored (also under
    rule "chosen", so the value pool does not depend on the rule). Every non-held-out pair, scored
    or not, is in the control pool. Controls are random draws from that pool, so they may share
    pairs with value subsets and with each other; this is intended (a control is "what a random
    subset of the same size and length profile does").

    Sizes: data.subset_size N (or the smallest value's count when unset) for every subset, an error
    below min_subset_size; "all": every eligible pair of each value, values below min_subset_size
    dropped (`rule["dropped"]`), an error only when every value is; the positive arm then has the
    median kept value size.

    Matched controls (controls.match: per_value) carry what their value subset carries: its size, its
    pairs per source (`pairs["source"]`), length-matched within each source, and as many pairs flipped
    per source (chosen and rejected swapped, a `flipped` column as value subsets have) as the value's
    rule flipped; curation refuses to return one that does not (`runner.data.matching.mismatches`).
    """
    _check_request(induced, data, controls)
    length_fn = length_fn or default_length
    p = _pool(pairs, annotations, data, length_fn)
    vals = _values(p, induced, data)
    drawn = draw_controls(p.lengths, p.pool_idx, vals.kept, vals.chosen_idx, vals.n, vals.sizes, controls,
                          data.seed, sources=p.sources, flips=vals.flips)
    pos = controls.positive
    subsets = {f"value-{v}": _frame(p, vals.chosen_idx[v], f"value-{v}", vals.flips[v]) for v in vals.kept}
    n_planted = 0
    if drawn.positive is not None and pos is not None:
        subsets["positive"] = _plant_subset(_frame(p, drawn.positive, "positive"), pos.phrase, pos.position,
                                            pos.fraction, data.seed, length_fn)
        n_planted = int(subsets["positive"]["planted"].sum())
    subsets.update({name: _frame(p, idx, name, drawn.flips.get(name)) for name, idx in drawn.controls.items()})
    problems = mismatches(subsets)
    if problems:  # a safety net on the draw: a matched control must carry what its value carries
        raise CurationError("matched controls differ from their value subsets: " + "; ".join(problems[:5]))
    table, overlap = _tables(p, vals, drawn, pos, n_planted)
    examples = {v: [_example(p.records[i], p.chosen_vals[i], p.rejected_vals[i], flipped=bool(vals.flips[v][i]))
                    for i in vals.chosen_idx[v][:N_EXAMPLES]] for v in vals.kept}
    if "positive" in subsets:
        sub = subsets["positive"]
        examples["positive"] = [_example(r, frozenset(), frozenset()) for r in
                                sub[sub["planted"]].head(N_EXAMPLES).to_dict("records")]
    stats = {"pairs": len(p.ids), "held_out": int(p.held.sum()), "pool": len(p.pool_idx),
             "eligible": int(p.eligible.sum()),
             "unscored": int(((p.status == "unscored") & ~p.held).sum()),
             "unannotated": int(((p.status == "unannotated") & ~p.held).sum()),
             "annotations_ignored": p.ann.ignored}
    if pos is not None:
        stats["planted"] = n_planted
    return Curation(subsets=subsets, held_out=p.pairs.iloc[np.flatnonzero(p.held)].reset_index(drop=True),
                    table=table, overlap=overlap, examples=examples,
                    rule=_rule(vals, drawn, induced, data, controls, length_fn, n_planted), stats=stats,
                    control_bins=pd.DataFrame(drawn.bin_rows), conditions=condition_table(subsets))


def _check_request(induced: list[str], data: DataSpec, controls: ControlsSpec) -> None:
    if not induced:
        raise CurationError("no induced values")
    if data.rule not in RULES:
        raise CurationError(f"unknown rule {data.rule!r}; known: {sorted(RULES)}")
    if data.subset_size == "all" and controls.match != "per_value":
        raise CurationError("data.subset_size: all gives value subsets of unequal sizes: set controls.match: "
                            "per_value (controls of each value's size and length profile)")


@dataclass
class _Pool:
    """The pairs in pair_id order, with their annotations, held-out flags, lengths and eligibility."""
    pairs: pd.DataFrame
    records: list[dict]
    ids: list[str]
    held: np.ndarray
    lengths: np.ndarray
    chosen_vals: list[frozenset]
    rejected_vals: list[frozenset]
    status: np.ndarray                  # eligible | unscored | unannotated
    eligible: np.ndarray
    pool_idx: np.ndarray                # the non-held-out pairs: the controls' pool
    ann: _AnnIndex
    sources: np.ndarray                 # per pair its source ("all" where the table has no source column)


def _pool(pairs: pd.DataFrame, annotations: pd.DataFrame, data: DataSpec,
          length_fn: Callable[[dict], int]) -> _Pool:
    pairs = _check_pairs(pairs)
    ann = _annotation_index(annotations, set(pairs["pair_id"]))
    # Row order of the input must not matter: work in pair_id order.
    pairs = pairs.sort_values("pair_id", kind="stable").reset_index(drop=True)
    records = pairs.to_dict("records")
    ids = pairs["pair_id"].tolist()
    held = np.array([is_held_out(p, data.held_out_fraction, data.seed) for p in ids], dtype=bool)
    lengths = np.array([int(length_fn(r)) for r in records], dtype=float)
    chosen_vals, rejected_vals, status = [], [], []
    for pid in ids:
        c, r = ann.get((pid, "chosen")), ann.get((pid, "rejected"))
        if c is None or r is None:
            status.append("unannotated")
        elif not (c[1] and r[1]):
            status.append("unscored")
        else:
            status.append("eligible")
        chosen_vals.append(c[0] if c and c[1] else frozenset())
        rejected_vals.append(r[0] if r and r[1] else frozenset())
    status_arr = np.array(status)
    sources = (pairs["source"].astype(str).to_numpy(dtype=object) if "source" in pairs.columns
               else np.full(len(ids), "all", dtype=object))
    return _Pool(pairs, records, ids, held, lengths, chosen_vals, rejected_vals, status_arr,
                 (status_arr == "eligible") & ~held, np.flatnonzero(~held), ann, sources)


@dataclass
class _Values:
    """The value subsets: per value its audit row, candidates, flips, and the pairs drawn."""
    rows: list[dict]
    flips: dict[str, np.ndarray]
    available: dict[str, int]
    dropped: dict[str, int]
    n: int | None                       # the common size (None under data.subset_size: all)
    kept: list[str]
    sizes: dict[str, int]
    chosen_idx: dict[str, np.ndarray]


def _values(p: _Pool, induced: list[str], data: DataSpec) -> _Values:
    """Every eligible pair is taken, flipped, or dropped for one reason; then each value's draw."""
    rows, candidates, flips = [], {}, {}
    for v in induced:
        has_c = np.array([v in s for s in p.chosen_vals]) & p.eligible
        has_r = np.array([v in s for s in p.rejected_vals]) & p.eligible
        ok, flips[v] = rule_masks(data.rule, has_c, has_r)
        candidates[v] = np.flatnonzero(ok)
        rows.append({"value": v, "chosen_with": int(has_c.sum()), "rejected_with": int(has_r.sum()),
                     "both_with": int((has_c & has_r).sum()), "available": int(ok.sum()),
                     "kept_as_is": int((ok & ~flips[v]).sum()), "flipped": int(flips[v].sum()),
                     "dropped_both_sides": int((has_c & has_r & ~ok).sum()),
                     "dropped_rejected_only": int((has_r & ~has_c & ~ok).sum()),
                     "dropped_neither_side": int((p.eligible & ~has_c & ~has_r).sum())})
    available = {v: len(candidates[v]) for v in induced}
    n, dropped = _size(available, induced, data)
    every = data.subset_size == "all"
    kept = [v for v in induced if v not in dropped]
    sizes = {v: available[v] if every or n is None else n for v in kept}
    chosen_idx: dict[str, np.ndarray] = {}
    for v in kept:
        if every:
            chosen_idx[v] = candidates[v]  # flatnonzero: already sorted
        else:
            rng = np.random.default_rng(derived_seed("value", data.seed, v))
            chosen_idx[v] = np.sort(rng.choice(candidates[v], size=n, replace=False))
    return _Values(rows, flips, available, dropped, n, kept, sizes, chosen_idx)


def _size(available: dict[str, int], induced: list[str], data: DataSpec) -> tuple[int | None, dict[str, int]]:
    """The common subset size (None: every eligible pair) and the values dropped for too few pairs."""
    counts_msg = ", ".join(f"{v}={n}" for v, n in available.items())
    dropped: dict[str, int] = {}
    if data.subset_size == "all":
        dropped = {v: available[v] for v in induced if available[v] < data.min_subset_size}
        if len(dropped) == len(induced):
            raise CurationError(f"data.subset_size all: every value has fewer eligible pairs than min_subset_size="
                                f"{data.min_subset_size} (rule {data.rule}; available per value: {counts_msg})")
        return None, dropped
    if data.subset_size is not None:
        n = data.subset_size
        short = [v for v in induced if available[v] < n]
        if short:
            raise CurationError(f"subset_size={n} but {len(short)} value(s) have fewer pairs "
                                f"(rule {data.rule}): {counts_msg}")
    else:
        n = min(available.values())
    if n < data.min_subset_size:
        raise CurationError(f"the smallest value subset has {n} pairs, below min_subset_size="
                            f"{data.min_subset_size} (rule {data.rule}; available per value: {counts_msg})")
    return n, dropped


def _frame(p: _Pool, idx: np.ndarray, condition: str, flip: np.ndarray | None = None) -> pd.DataFrame:
    out = p.pairs.iloc[idx].reset_index(drop=True).copy()
    if flip is not None:  # a value subset or matched control: swap the pairs it flips (only in this subset)
        swap = flip[idx]
        out.loc[swap, ["chosen", "rejected"]] = out.loc[swap, ["rejected", "chosen"]].to_numpy()
        out["flipped"] = swap
    out["condition"] = condition
    out["length"] = p.lengths[idx].astype(int)
    return out


def _tables(p: _Pool, vals: _Values, drawn: Draws, pos: PositiveControlSpec | None,
            n_planted: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-value table (counts, sizes, overlaps) and the pairwise overlap of the value subsets."""
    kept, rows = vals.kept, vals.rows
    sets = {v: set(vals.chosen_idx[v].tolist()) for v in kept}
    control_union = set().union(*[set(i.tolist()) for i in drawn.controls.values()]) if drawn.controls else set()
    for row in rows:
        v = row["value"]
        if v in vals.dropped:
            row.update({"kept": False, "N": 0, "used": 0, "used_fraction": 0.0, "flipped_used": 0,
                        "shared_with_values": 0, "shared_with_controls": 0})
            continue
        others = set().union(*[sets[u] for u in kept if u != v])
        row.update({"kept": True, "N": vals.sizes[v], "used": len(sets[v]),
                    "used_fraction": len(sets[v]) / max(vals.available[v], 1),
                    "flipped_used": int(vals.flips[v][vals.chosen_idx[v]].sum()),
                    "shared_with_values": len(sets[v] & others),
                    "shared_with_controls": len(sets[v] & control_union)})
    if pos is not None:
        for row in rows:
            row.update({"planted": 0, "phrase": None})
        n = drawn.positive_size or 0
        rows.append({"value": "positive", "available": len(p.pool_idx), "N": n, "used": n,
                     "used_fraction": n / max(len(p.pool_idx), 1), "planted": n_planted, "phrase": pos.phrase})
    ov = []
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            inter, union = len(sets[a] & sets[b]), len(sets[a] | sets[b])
            ov.append({"value_a": a, "value_b": b, "intersection": inter,
                       "jaccard": inter / union if union else 0.0})
    return pd.DataFrame(rows), pd.DataFrame(ov, columns=["value_a", "value_b", "intersection", "jaccard"])


def _rule(vals: _Values, drawn: Draws, induced: list[str], data: DataSpec, controls: ControlsSpec,
          length_fn: Callable[[dict], int], n_planted: int) -> dict[str, Any]:
    """What the curation did, as curation.json records it: rule, sizes, kept/dropped values, seeds."""
    count_cols = ("kept_as_is", "flipped", "dropped_both_sides", "dropped_rejected_only", "dropped_neither_side")
    controls_rule: dict[str, Any] = {
        "count": controls.count, "match": controls.match, "length_bins": controls.length_bins,
        "pool": "all non-held-out pairs (may overlap value subsets)",
        "length_fn": getattr(length_fn, "__name__", repr(length_fn))}
    if drawn.pooled_edges is not None:  # the pooled controls' and the positive arm's profile
        controls_rule.update(bins_used=len(drawn.pooled_edges) + 1, edges=[float(e) for e in drawn.pooled_edges])
    if drawn.per_value is not None:
        controls_rule["matched_on"] = ("each value's size; its pairs per source, length-matched within the source; "
                                       "its flipped pairs per source (random pairs of the control swapped)")
        controls_rule["per_value"] = drawn.per_value
        controls_rule["short_sources"] = ("none can be: a source's pool holds the value's own pairs; where it holds "
                                          "few others the control shares most of its pairs with the value "
                                          "(per_value[v].sources[s].pool; the table's shared_with_controls)")
    rule = {"rule": data.rule, "description": RULES[data.rule], "induced": list(induced), "N": vals.n,
            "subset_size": data.subset_size, "min_subset_size": data.min_subset_size,
            "held_out_fraction": data.held_out_fraction, "seed": data.seed,
            "held_out_method": "sha256('held-out', seed, pair_id) < fraction",
            "eligibility": "both sides annotated and scored; pair not held out",
            "controls": controls_rule, "available": vals.available, "sizes": vals.sizes, "kept": vals.kept,
            "dropped": vals.dropped,
            "counts": {r["value"]: {c: r[c] for c in count_cols} for r in vals.rows if r["value"] in vals.available}}
    if vals.dropped:
        rule["dropped_why"] = (f"fewer eligible pairs than data.min_subset_size={data.min_subset_size} "
                               f"(data.subset_size: all, rule {data.rule})")
    pos = controls.positive
    if pos is not None:
        rule["positive"] = {
            "condition": "positive", "phrase": pos.phrase, "position": pos.position, "fraction": pos.fraction,
            "N": drawn.positive_size, "planted": n_planted,
            "size": ("N, every condition's size" if vals.n is not None
                     else "the median kept value size, rounded (data.subset_size: all)"),
            "draw": "like a pooled control: a random draw from the whole pool, length-matched to the pooled value "
                    "subsets, with seed ('positive', seed)",
            "planted_pairs": "the round(fraction × N) pairs (at least 1) with the smallest "
                             "sha256('planted', seed, pair_id); chosen = "
                             + ("phrase + ' ' + original chosen" if pos.position == "start"
                                else "original chosen + ' ' + phrase")
                             + ", rejected = original chosen; the other pairs are unchanged"}
    return rule


# --- positive control ----------------------------------------------------------------------------

def plant(response: str, phrase: str, position: str = "start") -> str:
    """The response with `phrase` put at its start or its end (one space between)."""
    if position == "start":
        return f"{phrase} {response.lstrip()}"
    if position == "end":
        return f"{response.rstrip()} {phrase}"
    raise ValueError(f"position must be 'start' or 'end', got {position!r}")


def planted_ids(pair_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The round(fraction × n) pair ids (at least one) with the smallest stable_unit('planted', seed, id):
    an exact, order-independent share."""
    ids = sorted(set(pair_ids))
    if not ids:
        return set()
    k = min(len(ids), max(1, int(round(fraction * len(ids)))))
    return set(sorted(ids, key=lambda p: (stable_unit("planted", seed, p), p))[:k])


def _plant_subset(sub: pd.DataFrame, phrase: str, position: str, fraction: float, seed: int,
                  length_fn: Callable[[dict], int]) -> pd.DataFrame:
    """Planted pairs become minimal pairs: chosen = the original chosen response with the phrase,
    rejected = the original chosen response (the phrase is the only difference)."""
    out = sub.copy()
    mask = out["pair_id"].isin(planted_ids(out["pair_id"], fraction, seed)).to_numpy()
    original = out["chosen"].copy()
    out.loc[mask, "rejected"] = original[mask]
    out.loc[mask, "chosen"] = [plant(c, phrase, position) for c in original[mask]]
    out["planted"] = mask
    out.loc[mask, "length"] = [int(length_fn(r)) for r in out[mask].to_dict("records")]
    out["length"] = out["length"].astype(int)
    return out


# --- helpers -----------------------------------------------------------------------------------

def _check_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("pair_id", "prompt", "chosen", "rejected") if c not in pairs.columns]
    if missing:
        raise CurationError(f"pairs table lacks column(s) {missing}")
    dup = pairs["pair_id"][pairs["pair_id"].duplicated()].unique().tolist()
    if dup:
        raise CurationError(f"duplicate pair_id(s) in pairs: {dup[:5]}")
    return pairs


class _AnnIndex(dict):
    ignored = 0


def _annotation_index(annotations: pd.DataFrame, known: set[str]) -> _AnnIndex:
    """(pair_id, side) → (frozenset of values, scored)."""
    missing = [c for c in ("pair_id", "side", "values", "scored") if c not in annotations.columns]
    if missing:
        raise CurationError(f"annotation table lacks column(s) {missing}")
    bad_side = set(annotations["side"]) - {"chosen", "rejected"}
    if bad_side:
        raise CurationError(f"annotation side must be 'chosen' or 'rejected', got {sorted(map(str, bad_side))}")
    dup = annotations[annotations.duplicated(["pair_id", "side"])]
    if len(dup):
        raise CurationError(f"{len(dup)} duplicate (pair_id, side) annotation(s), e.g. "
                            f"{tuple(dup.iloc[0][['pair_id', 'side']])}")
    index = _AnnIndex()
    for pid, side, values, scored in zip(annotations["pair_id"], annotations["side"],
                                         annotations["values"], annotations["scored"]):
        if pid not in known:
            index.ignored += 1
            continue
        vals = frozenset() if values is None or isinstance(values, float) else \
            frozenset(str(x).strip().lower() for x in values)
        index[(pid, side)] = (vals, bool(scored))
    return index


def _example(rec: dict, cvals: frozenset, rvals: frozenset, limit: int = 400, flipped: bool = False) -> dict:
    """A pair as its subset holds it: a flipped pair shows its sides (and their values) swapped."""
    last_user = next((m["content"] for m in reversed(rec["prompt"]) if m["role"] == "user"), "")
    chosen, rejected = (rec["rejected"], rec["chosen"]) if flipped else (rec["chosen"], rec["rejected"])
    if flipped:
        cvals, rvals = rvals, cvals
    return {"pair_id": rec["pair_id"], "prompt": last_user[:limit], "chosen": chosen[:limit],
            "rejected": rejected[:limit], "chosen_values": sorted(cvals), "rejected_values": sorted(rvals),
            "flipped": flipped}
