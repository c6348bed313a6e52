"""Curation: from annotated preference pairs to equal-size value subsets, length-matched random
controls and a held-out split. Pure and deterministic: same inputs and spec → identical subsets.

Conditions are named like `Spec.conditions()`: "value-<v>" per induced value, "control-<k>", and
"positive" (controls.positive: a control-like draw in which a share of pairs carry a planted phrase).
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
}
N_EXAMPLES = 3


class CurationError(ValindError):
    """The annotated pairs cannot yield the requested subsets (the message gives the counts)."""


@dataclass
class Curation:
    """Subsets keyed by condition name, the held-out pairs, and the audit tables."""
    subsets: dict[str, pd.DataFrame]
    held_out: pd.DataFrame
    table: pd.DataFrame                 # per value: counts available/used, overlaps
    overlap: pd.DataFrame               # pairwise Jaccard between value subsets
    examples: dict[str, list[dict]]     # a few pairs per value subset
    rule: dict[str, Any]                # rule, thresholds, N, seeds: record it with the subsets
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


def curate(pairs: pd.DataFrame, annotations: pd.DataFrame, induced: list[str], data: DataSpec,
           controls: ControlsSpec, length_fn: Callable[[dict], int] | None = None) -> Curation:
    """Build value subsets, controls and the held-out split.

    Eligibility: a pair enters value subsets only if both sides are annotated and scored (also under
    rule "chosen", so the value pool does not depend on the rule). Every non-held-out pair, scored
    or not, is in the control pool. Controls are random draws from that pool, so they may share
    pairs with value subsets and with each other; this is intended (a control is "what a random
    subset of the same size and length profile does").
    """
    if not induced:
        raise CurationError("no induced values")
    if data.rule not in RULES:
        raise CurationError(f"unknown rule {data.rule!r}; known: {sorted(RULES)}")
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

    # --- value subsets ---
    rows, candidates = [], {}
    for v in induced:
        has_c = np.array([v in s for s in chosen_vals]) & eligible
        has_r = np.array([v in s for s in rejected_vals]) & eligible
        ok = has_c & ~has_r if data.rule == "chosen_not_rejected" else has_c
        candidates[v] = np.flatnonzero(ok)
        rows.append({"value": v, "chosen_with": int(has_c.sum()), "rejected_with": int(has_r.sum()),
                     "both_with": int((has_c & has_r).sum()), "available": int(ok.sum())})
    available = {v: len(candidates[v]) for v in induced}
    counts_msg = ", ".join(f"{v}={n}" for v, n in available.items())
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

    chosen_idx: dict[str, np.ndarray] = {}
    for v in induced:
        rng = np.random.default_rng(derived_seed("value", data.seed, v))
        chosen_idx[v] = np.sort(rng.choice(candidates[v], size=n, replace=False))

    # --- controls: length-matched to the pooled value subsets (a multiset: each value weighs N) ---
    pooled = np.concatenate([lengths[chosen_idx[v]] for v in induced])
    edges = bin_edges(pooled, controls.length_bins)
    n_bins = len(edges) + 1
    targets = proportional_counts(np.bincount(assign_bins(pooled, edges), minlength=n_bins), n)
    pool_bins = assign_bins(lengths[pool_idx], edges)
    pos = controls.positive
    if (controls.count or pos is not None) and len(pool_idx) < n:
        raise CurationError(f"the control pool has {len(pool_idx)} non-held-out pairs, fewer than N={n}")
    lo_edges = np.concatenate([[-np.inf], edges])
    hi_edges = np.concatenate([edges, [np.inf]])
    bin_rows = []

    def draw(rng: np.random.Generator, condition: str) -> np.ndarray:
        """N pairs of the pool, length-matched per bin; a short bin is filled at random from the rest."""
        picked, drawn = [], []
        for b in range(n_bins):
            in_bin = pool_idx[pool_bins == b]
            take = min(int(targets[b]), len(in_bin))
            picked.append(rng.choice(in_bin, size=take, replace=False))
            drawn.append(take)
        got = np.concatenate(picked) if picked else np.array([], dtype=int)
        shortfall = n - len(got)
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

    control_idx: dict[int, np.ndarray] = {}
    for k in range(controls.count):
        control_idx[k] = draw(np.random.default_rng(derived_seed("control", data.seed, k)), f"control-{k}")
    # --- positive control: a control-like draw (own seed) in which a share of pairs is planted ---
    positive_idx = draw(np.random.default_rng(derived_seed("positive", data.seed)), "positive") \
        if pos is not None else None

    # --- outputs ---
    def frame(idx: np.ndarray, condition: str) -> pd.DataFrame:
        out = pairs.iloc[idx].reset_index(drop=True).copy()
        out["condition"] = condition
        out["length"] = lengths[idx].astype(int)
        return out

    subsets = {f"value-{v}": frame(chosen_idx[v], f"value-{v}") for v in induced}
    n_planted = 0
    if positive_idx is not None:
        subsets["positive"] = _plant_subset(frame(positive_idx, "positive"), pos.phrase, pos.position,
                                            pos.fraction, data.seed, length_fn)
        n_planted = int(subsets["positive"]["planted"].sum())
    subsets.update({f"control-{k}": frame(control_idx[k], f"control-{k}") for k in control_idx})

    sets = {v: set(chosen_idx[v].tolist()) for v in induced}
    control_union = set().union(*[set(i.tolist()) for i in control_idx.values()]) if control_idx else set()
    for row in rows:
        v = row["value"]
        others = set().union(*[sets[u] for u in induced if u != v])
        row.update({"N": n, "used": len(sets[v]), "used_fraction": len(sets[v]) / max(available[v], 1),
                    "shared_with_values": len(sets[v] & others),
                    "shared_with_controls": len(sets[v] & control_union)})
    if pos is not None:
        for row in rows:
            row.update({"planted": 0, "phrase": None})
        rows.append({"value": "positive", "available": len(pool_idx), "N": n, "used": n,
                     "used_fraction": n / max(len(pool_idx), 1), "planted": n_planted, "phrase": pos.phrase})
    table = pd.DataFrame(rows)

    ov = []
    for i, a in enumerate(induced):
        for b in induced[i + 1:]:
            inter, union = len(sets[a] & sets[b]), len(sets[a] | sets[b])
            ov.append({"value_a": a, "value_b": b, "intersection": inter,
                       "jaccard": inter / union if union else 0.0})
    overlap = pd.DataFrame(ov, columns=["value_a", "value_b", "intersection", "jaccard"])

    examples = {v: [_example(records[i], chosen_vals[i], rejected_vals[i])
                    for i in chosen_idx[v][:N_EXAMPLES]] for v in induced}
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
    rule = {"rule": data.rule, "description": RULES[data.rule], "induced": list(induced), "N": n,
            "subset_size": data.subset_size, "min_subset_size": data.min_subset_size,
            "held_out_fraction": data.held_out_fraction, "seed": data.seed,
            "held_out_method": "sha256('held-out', seed, pair_id) < fraction",
            "eligibility": "both sides annotated and scored; pair not held out",
            "controls": {"count": controls.count, "length_bins": controls.length_bins,
                         "bins_used": n_bins, "edges": [float(e) for e in edges],
                         "pool": "all non-held-out pairs (may overlap value subsets)",
                         "length_fn": getattr(length_fn, "__name__", repr(length_fn))},
            "available": available}
    if pos is not None:
        rule["positive"] = {
            "condition": "positive", "phrase": pos.phrase, "position": pos.position, "fraction": pos.fraction,
            "N": n, "planted": n_planted,
            "draw": "like a control: a length-matched random draw from the pool with seed ('positive', seed)",
            "planted_pairs": f"the round(fraction × N) pairs (at least 1) with the smallest "
                             f"sha256('planted', seed, pair_id); chosen = "
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


def _example(rec: dict, cvals: frozenset, rvals: frozenset, limit: int = 400) -> dict:
    last_user = next((m["content"] for m in reversed(rec["prompt"]) if m["role"] == "user"), "")
    return {"pair_id": rec["pair_id"], "prompt": last_user[:limit], "chosen": rec["chosen"][:limit],
            "rejected": rec["rejected"][:limit], "chosen_values": sorted(cvals),
            "rejected_values": sorted(rvals)}
