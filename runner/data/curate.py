"""Curation: from annotated preference pairs to value subsets (equal-size, or every eligible pair
under data.subset_size: all), length-matched random controls and a held-out split. Pure and
deterministic: same inputs and spec → identical subsets.

Conditions are named like `Spec.conditions()`: "value-<v>" per induced value, "control-<k>" (pooled
controls) or "control-<v>-<k>" (controls.match: per_value), and "positive" (controls.positive: a
control-like draw in which a share of pairs carry a planted phrase).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from evaluation.errors import ValindError
from runner.data.sources import prompt_text
from runner.spec import ControlsSpec, DataSpec

ANNOTATION_COLUMNS = ("pair_id", "side", "values", "scored", "raw")
RULES = {
    "chosen_not_rejected": "V is among the chosen response's values and not among the rejected one's",
    "chosen": "V is among the chosen response's values (the rejected side is not consulted)",
    "exactly_one_side_flip": "V is among the values of exactly one response; where it is only among the "
                             "rejected one's, chosen and rejected are swapped in V's subset (the paper's rule)",
}
N_EXAMPLES = 3


class CurationError(ValindError):
    """The annotated pairs cannot yield the requested subsets (the message gives the counts)."""


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


def default_length(pair: dict) -> int:
    """Whitespace token count of the prompt text, the chosen and the rejected response."""
    return len(prompt_text(pair["prompt"]).split()) + len(pair["chosen"].split()) + len(pair["rejected"].split())


def stable_unit(*parts: Any) -> float:
    """A uniform number in [0, 1) from a hash of the parts (platform- and order-independent)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def derived_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def is_held_out(pair_id: str, fraction: float, seed: int) -> bool:
    """Held-out membership depends only on (pair_id, seed): adding or removing other pairs never
    moves a pair in or out, so the held-out set is stable across `max_pairs` changes."""
    return stable_unit("held-out", seed, pair_id) < fraction


def bin_edges(lengths: Iterable[float], n_bins: int) -> np.ndarray:
    """Inner quantile edges of `lengths` (ties can merge bins, so there may be fewer than n_bins)."""
    arr = np.asarray(list(lengths), dtype=float)
    if n_bins <= 1 or arr.size == 0:
        return np.array([], dtype=float)
    return np.unique(np.quantile(arr, np.arange(1, n_bins) / n_bins))


def assign_bins(lengths: Iterable[float], edges: np.ndarray) -> np.ndarray:
    """Bin index per length: bin b holds edges[b-1] < x <= edges[b]; outside values go to the ends."""
    return np.searchsorted(edges, np.asarray(list(lengths), dtype=float), side="left")


def proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to weights (largest remainder, ties → lower bin)."""
    w = np.asarray(weights, dtype=float)
    if total == 0 or w.sum() == 0:
        return np.zeros(len(w), dtype=int)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


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
    dropped (`rule["dropped"]`), an error only when every value is.
    """
    if not induced:
        raise CurationError("no induced values")
    if data.rule not in RULES:
        raise CurationError(f"unknown rule {data.rule!r}; known: {sorted(RULES)}")
    every = data.subset_size == "all"
    if every and controls.match != "per_value":
        raise CurationError("data.subset_size: all gives value subsets of unequal sizes: set controls.match: "
                            "per_value (controls of each value's size and length profile)")
    if every and controls.positive is not None:
        raise CurationError("controls.positive needs equal-size value subsets, not data.subset_size: all")
    length_fn = length_fn or default_length
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
    eligible = (status_arr == "eligible") & ~held
    pool_idx = np.flatnonzero(~held)

    # --- value subsets: every eligible pair is taken, flipped, or dropped for one reason ---
    rows, candidates, flips = [], {}, {}
    for v in induced:
        has_c = np.array([v in s for s in chosen_vals]) & eligible
        has_r = np.array([v in s for s in rejected_vals]) & eligible
        ok, flips[v] = rule_masks(data.rule, has_c, has_r)
        candidates[v] = np.flatnonzero(ok)
        rows.append({"value": v, "chosen_with": int(has_c.sum()), "rejected_with": int(has_r.sum()),
                     "both_with": int((has_c & has_r).sum()), "available": int(ok.sum()),
                     "kept_as_is": int((ok & ~flips[v]).sum()), "flipped": int(flips[v].sum()),
                     "dropped_both_sides": int((has_c & has_r & ~ok).sum()),
                     "dropped_rejected_only": int((has_r & ~has_c & ~ok).sum()),
                     "dropped_neither_side": int((eligible & ~has_c & ~has_r).sum())})
    available = {v: len(candidates[v]) for v in induced}
    counts_msg = ", ".join(f"{v}={n}" for v, n in available.items())
    dropped: dict[str, int] = {}
    if every:
        dropped = {v: available[v] for v in induced if available[v] < data.min_subset_size}
        if len(dropped) == len(induced):
            raise CurationError(f"data.subset_size all: every value has fewer eligible pairs than min_subset_size="
                                f"{data.min_subset_size} (rule {data.rule}; available per value: {counts_msg})")
        n = None
    elif data.subset_size is not None:
        n = data.subset_size
        short = [v for v in induced if available[v] < n]
        if short:
            raise CurationError(f"subset_size={n} but {len(short)} value(s) have fewer pairs "
                                f"(rule {data.rule}): {counts_msg}")
    else:
        n = min(available.values())
    if n is not None and n < data.min_subset_size:
        raise CurationError(f"the smallest value subset has {n} pairs, below min_subset_size="
                            f"{data.min_subset_size} (rule {data.rule}; available per value: {counts_msg})")
    kept = [v for v in induced if v not in dropped]
    sizes = {v: available[v] if every else n for v in kept}

    chosen_idx: dict[str, np.ndarray] = {}
    for v in kept:
        if every:
            chosen_idx[v] = candidates[v]  # flatnonzero: already sorted
        else:
            rng = np.random.default_rng(derived_seed("value", data.seed, v))
            chosen_idx[v] = np.sort(rng.choice(candidates[v], size=n, replace=False))

    # --- controls: random draws from the pool, length-matched to a target profile per bin ---
    pos = controls.positive
    bin_rows = []

    def profile(target: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Quantile edges of the target lengths and the per-bin counts of a draw of `size` pairs."""
        edges = bin_edges(target, controls.length_bins)
        return edges, proportional_counts(np.bincount(assign_bins(target, edges), minlength=len(edges) + 1), size)

    def draw(rng: np.random.Generator, condition: str, size: int, edges: np.ndarray,
             targets: np.ndarray) -> np.ndarray:
        """`size` pairs of the pool, length-matched per bin; a short bin is filled at random from the rest."""
        if len(pool_idx) < size:
            raise CurationError(f"the control pool has {len(pool_idx)} non-held-out pairs, fewer than N={size} "
                                f"({condition})")
        n_bins = len(edges) + 1
        pool_bins = assign_bins(lengths[pool_idx], edges)
        lo_edges, hi_edges = np.concatenate([[-np.inf], edges]), np.concatenate([edges, [np.inf]])
        picked, drawn = [], []
        for b in range(n_bins):
            in_bin = pool_idx[pool_bins == b]
            take = min(int(targets[b]), len(in_bin))
            picked.append(rng.choice(in_bin, size=take, replace=False))
            drawn.append(take)
        got = np.concatenate(picked) if picked else np.array([], dtype=int)
        shortfall = size - len(got)
        if shortfall:
            # a bin of the pool had fewer pairs than its target: fill at random from the rest
            rest = np.setdiff1d(pool_idx, got)
            extra = rng.choice(rest, size=shortfall, replace=False)
            got = np.concatenate([got, extra])
            extra_bins = np.bincount(assign_bins(lengths[extra], edges), minlength=n_bins)
            drawn = [d + int(e) for d, e in zip(drawn, extra_bins)]
        for b in range(n_bins):
            bin_rows.append({"condition": condition, "bin": b, "lo": float(lo_edges[b]),
                             "hi": float(hi_edges[b]), "target": int(targets[b]), "drawn": drawn[b],
                             "pool": int((pool_bins == b).sum()), "filled_at_random": shortfall})
        return np.sort(got)

    control_idx: dict[str, np.ndarray] = {}
    pooled_edges = per_value_edges = None
    if controls.match == "pooled" or pos is not None:
        # the pooled value subsets, a multiset: each value weighs N
        pooled_edges, pooled_targets = profile(np.concatenate([lengths[chosen_idx[v]] for v in kept]), n)
    if controls.match == "pooled":
        for k in range(controls.count):
            control_idx[f"control-{k}"] = draw(np.random.default_rng(derived_seed("control", data.seed, k)),
                                               f"control-{k}", n, pooled_edges, pooled_targets)
    else:  # per value: that value's size and length profile, an own seed per (value, k)
        per_value_edges = {}
        for v in kept:
            edges, targets = profile(lengths[chosen_idx[v]], sizes[v])
            per_value_edges[v] = edges
            for k in range(controls.count):
                name = f"control-{v}-{k}"
                control_idx[name] = draw(np.random.default_rng(derived_seed("control", data.seed, v, k)), name,
                                         sizes[v], edges, targets)
    # --- positive control: a control-like draw (own seed) in which a share of pairs is planted ---
    positive_idx = draw(np.random.default_rng(derived_seed("positive", data.seed)), "positive", n,
                        pooled_edges, pooled_targets) if pos is not None else None

    # --- outputs ---
    def frame(idx: np.ndarray, condition: str, flip: np.ndarray | None = None) -> pd.DataFrame:
        out = pairs.iloc[idx].reset_index(drop=True).copy()
        if flip is not None:  # a value subset: swap the pairs its rule flips (only in this subset)
            swap = flip[idx]
            out.loc[swap, ["chosen", "rejected"]] = out.loc[swap, ["rejected", "chosen"]].to_numpy()
            out["flipped"] = swap
        out["condition"] = condition
        out["length"] = lengths[idx].astype(int)
        return out

    subsets = {f"value-{v}": frame(chosen_idx[v], f"value-{v}", flips[v]) for v in kept}
    n_planted = 0
    if positive_idx is not None:
        subsets["positive"] = _plant_subset(frame(positive_idx, "positive"), pos.phrase, pos.position,
                                            pos.fraction, data.seed, length_fn)
        n_planted = int(subsets["positive"]["planted"].sum())
    subsets.update({name: frame(idx, name) for name, idx in control_idx.items()})

    sets = {v: set(chosen_idx[v].tolist()) for v in kept}
    control_union = set().union(*[set(i.tolist()) for i in control_idx.values()]) if control_idx else set()
    for row in rows:
        v = row["value"]
        if v in dropped:
            row.update({"kept": False, "N": 0, "used": 0, "used_fraction": 0.0, "flipped_used": 0,
                        "shared_with_values": 0, "shared_with_controls": 0})
            continue
        others = set().union(*[sets[u] for u in kept if u != v])
        row.update({"kept": True, "N": sizes[v], "used": len(sets[v]),
                    "used_fraction": len(sets[v]) / max(available[v], 1),
                    "flipped_used": int(flips[v][chosen_idx[v]].sum()),
                    "shared_with_values": len(sets[v] & others),
                    "shared_with_controls": len(sets[v] & control_union)})
    if pos is not None:
        for row in rows:
            row.update({"planted": 0, "phrase": None})
        rows.append({"value": "positive", "available": len(pool_idx), "N": n, "used": n,
                     "used_fraction": n / max(len(pool_idx), 1), "planted": n_planted, "phrase": pos.phrase})
    table = pd.DataFrame(rows)

    ov = []
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            inter, union = len(sets[a] & sets[b]), len(sets[a] | sets[b])
            ov.append({"value_a": a, "value_b": b, "intersection": inter,
                       "jaccard": inter / union if union else 0.0})
    overlap = pd.DataFrame(ov, columns=["value_a", "value_b", "intersection", "jaccard"])

    examples = {v: [_example(records[i], chosen_vals[i], rejected_vals[i], flipped=bool(flips[v][i]))
                    for i in chosen_idx[v][:N_EXAMPLES]] for v in kept}
    if positive_idx is not None:
        sub = subsets["positive"]
        examples["positive"] = [_example(r, frozenset(), frozenset()) for r in
                                sub[sub["planted"]].head(N_EXAMPLES).to_dict("records")]

    stats = {"pairs": len(ids), "held_out": int(held.sum()), "pool": len(pool_idx),
             "eligible": int(eligible.sum()),
             "unscored": int(((status_arr == "unscored") & ~held).sum()),
             "unannotated": int(((status_arr == "unannotated") & ~held).sum()),
             "annotations_ignored": ann.ignored}
    if pos is not None:
        stats["planted"] = n_planted
    count_cols = ("kept_as_is", "flipped", "dropped_both_sides", "dropped_rejected_only", "dropped_neither_side")
    controls_rule = {"count": controls.count, "match": controls.match, "length_bins": controls.length_bins,
                     "pool": "all non-held-out pairs (may overlap value subsets)",
                     "length_fn": getattr(length_fn, "__name__", repr(length_fn))}
    if pooled_edges is not None:  # the pooled controls' and the positive arm's profile
        controls_rule.update(bins_used=len(pooled_edges) + 1, edges=[float(e) for e in pooled_edges])
    if per_value_edges is not None:
        controls_rule["per_value"] = {v: {"N": sizes[v], "bins_used": len(e) + 1, "edges": [float(x) for x in e],
                                          "seed": f"('control', seed, '{v}', k)"}
                                      for v, e in per_value_edges.items()}
    rule = {"rule": data.rule, "description": RULES[data.rule], "induced": list(induced), "N": n,
            "subset_size": data.subset_size, "min_subset_size": data.min_subset_size,
            "held_out_fraction": data.held_out_fraction, "seed": data.seed,
            "held_out_method": "sha256('held-out', seed, pair_id) < fraction",
            "eligibility": "both sides annotated and scored; pair not held out",
            "controls": controls_rule, "available": available, "sizes": sizes, "kept": kept,
            "dropped": dropped,
            "counts": {r["value"]: {c: r[c] for c in count_cols} for r in rows if r["value"] in available}}
    if dropped:
        rule["dropped_why"] = (f"fewer eligible pairs than data.min_subset_size={data.min_subset_size} "
                               f"(data.subset_size: all, rule {data.rule})")
    if pos is not None:
        rule["positive"] = {
            "condition": "positive", "phrase": pos.phrase, "position": pos.position, "fraction": pos.fraction,
            "N": n, "planted": n_planted,
            "draw": "like a control: a length-matched random draw from the pool with seed ('positive', seed)",
            "planted_pairs": "the round(fraction × N) pairs (at least 1) with the smallest "
                             "sha256('planted', seed, pair_id); chosen = "
                             + ("phrase + ' ' + original chosen" if pos.position == "start"
                                else "original chosen + ' ' + phrase")
                             + ", rejected = original chosen; the other pairs are unchanged"}
    return Curation(subsets=subsets, held_out=pairs.iloc[np.flatnonzero(held)].reset_index(drop=True),
                    table=table, overlap=overlap, examples=examples, rule=rule, stats=stats,
                    control_bins=pd.DataFrame(bin_rows))


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
