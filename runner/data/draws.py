"""Length-matched random draws from the control pool: the random controls (pooled, or per value) and
the positive arm, each a draw whose length profile per bin follows its target subsets'."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from evaluation.errors import ValindError
from runner.spec_sections import ControlsSpec


class CurationError(ValindError):
    """The annotated pairs cannot yield the requested subsets (the message gives the counts)."""


def stable_unit(*parts: Any) -> float:
    """A uniform number in [0, 1) from a hash of the parts (platform- and order-independent)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def derived_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


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


@dataclass
class Draws:
    """The controls' and the positive arm's pairs (indices into the pool's pairs), their bins' audit rows
    and the length-bin edges used; matched controls' flips (pool-wide masks) and each value's match audit."""
    controls: dict[str, np.ndarray] = field(default_factory=dict)
    positive: np.ndarray | None = None
    positive_size: int | None = None
    bin_rows: list[dict[str, Any]] = field(default_factory=list)
    pooled_edges: np.ndarray | None = None
    flips: dict[str, np.ndarray] = field(default_factory=dict)      # control-<v>-<k> → pairs it swaps
    per_value: dict[str, dict[str, Any]] | None = None             # per value: sources, flip share, edges


class _Drawer:
    """Draws of the pool's pairs length-matched to a target profile, recording each bin's audit row."""

    def __init__(self, lengths: np.ndarray, pool_idx: np.ndarray, n_bins: int, out: Draws) -> None:
        self.lengths, self.pool_idx, self.n_bins, self.out = lengths, pool_idx, n_bins, out

    def profile(self, target: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Quantile edges of the target lengths and the per-bin counts of a draw of `size` pairs."""
        edges = bin_edges(target, self.n_bins)
        return edges, proportional_counts(np.bincount(assign_bins(target, edges), minlength=len(edges) + 1), size)

    def draw(self, rng: np.random.Generator, condition: str, size: int, edges: np.ndarray, targets: np.ndarray,
             pool: np.ndarray | None = None, source: str = "all") -> np.ndarray:
        """`size` pairs of `pool` (default: the whole pool), length-matched per bin; a short bin is filled at
        random from the rest of `pool`. `source` names the stratum in the audit rows."""
        pool_idx, lengths = self.pool_idx if pool is None else pool, self.lengths
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
            self.out.bin_rows.append({"condition": condition, "source": source, "bin": b, "lo": float(lo_edges[b]),
                                      "hi": float(hi_edges[b]), "target": int(targets[b]), "drawn": drawn[b],
                                      "pool": int((pool_bins == b).sum()), "filled_at_random": shortfall})
        return np.sort(got)


def draw_controls(lengths: np.ndarray, pool_idx: np.ndarray, kept: list[str], chosen_idx: dict[str, np.ndarray],
                  n: int | None, sizes: dict[str, int], controls: ControlsSpec, seed: int,
                  sources: np.ndarray | None = None, flips: dict[str, np.ndarray] | None = None) -> Draws:
    """The random controls ("control-<k>" pooled, or "control-<v>-<k>" matched per value, each with its own
    seed) and the positive arm (a control-like draw, seed ('positive', seed)) when controls.positive is set.
    `sources` (per pair) and `flips` (per value: the pairs its rule swaps) are what matched controls carry
    (`draw_matched`); without them every pair counts as one source and nothing is flipped."""
    out = Draws()
    d = _Drawer(lengths, pool_idx, controls.length_bins, out)
    pooled_targets = None
    if controls.positive is not None:
        # equal sizes: N; data.subset_size: all: the median kept value size (rounded)
        out.positive_size = n if n is not None else int(round(float(np.median([sizes[v] for v in kept]))))
    if controls.match == "pooled" or controls.positive is not None:
        # the pooled value subsets, a multiset: each value weighs its size
        out.pooled_edges, pooled_targets = d.profile(np.concatenate([lengths[chosen_idx[v]] for v in kept]),
                                                     n if n is not None else out.positive_size or 0)
    if controls.match == "pooled":
        assert out.pooled_edges is not None and pooled_targets is not None and n is not None
        for k in range(controls.count):
            out.controls[f"control-{k}"] = d.draw(np.random.default_rng(derived_seed("control", seed, k)),
                                                  f"control-{k}", n, out.pooled_edges, pooled_targets)
    else:
        src = sources if sources is not None else np.full(len(lengths), "all", dtype=object)
        no_flip = np.zeros(len(lengths), dtype=bool)
        out.per_value = {v: draw_matched(d, v, chosen_idx[v], src, (flips or {}).get(v, no_flip), controls.count,
                                         seed) for v in kept}
    if controls.positive is not None:
        assert out.pooled_edges is not None and pooled_targets is not None and out.positive_size is not None
        out.positive = d.draw(np.random.default_rng(derived_seed("positive", seed)), "positive", out.positive_size,
                              out.pooled_edges, pooled_targets)
    return out


def draw_matched(d: _Drawer, value: str, value_idx: np.ndarray, sources: np.ndarray, flip: np.ndarray,
                 count: int, seed: int) -> dict[str, Any]:
    """`count` controls "control-<value>-<k>" that carry what the value subset carries: per source the
    value's number of pairs, length-matched to the value's pairs of that source, and as many of them
    flipped (chosen and rejected swapped; pairs picked at random, seed ('control-flip', seed, value, k))
    as the value's flipped pairs of that source. A source's pool holds the value's own pairs, so it is
    never short of them; where it holds few others, the control shares most pairs with the value (the
    audit gives each source's pool). Returns the value's match audit."""
    strata = sorted(set(sources[value_idx].tolist()))
    audit: dict[str, Any] = {"N": len(value_idx), "flipped": int(flip[value_idx].sum()),
                             "flip_share": float(flip[value_idx].mean()) if len(value_idx) else 0.0,
                             "seed": f"('control', seed, '{value}', k)",
                             "flip_seed": f"('control-flip', seed, '{value}', k)", "sources": {}}
    plan = []
    for s in strata:
        own = value_idx[sources[value_idx] == s]
        edges, targets = d.profile(d.lengths[own], len(own))
        plan.append((s, int(flip[own].sum()), _source_pool(d.pool_idx, sources, s), edges, targets))
        audit["sources"][s] = {"N": len(own), "pool": len(plan[-1][2]), "flipped": plan[-1][1],
                               "bins_used": len(edges) + 1, "edges": [float(e) for e in edges]}
    for k in range(count):
        name = f"control-{value}-{k}"
        rng = np.random.default_rng(derived_seed("control", seed, value, k))
        frng = np.random.default_rng(derived_seed("control-flip", seed, value, k))
        mask, parts = np.zeros(len(flip), dtype=bool), []
        for s, n_flip, pool_s, edges, targets in plan:
            got = d.draw(rng, name, int(targets.sum()), edges, targets, pool=pool_s, source=s)
            mask[frng.choice(got, size=n_flip, replace=False)] = True
            parts.append(got)
        d.out.controls[name] = np.sort(np.concatenate(parts))
        d.out.flips[name] = mask
    return audit


def _source_pool(pool_idx: np.ndarray, sources: np.ndarray, source: str) -> np.ndarray:
    """The pool's pairs of one source (the matched controls' stratum)."""
    return pool_idx[sources[pool_idx] == source]
