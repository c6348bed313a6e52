"""Sanity checks on generations (pure: tables in, tables out).

`changed_share`: a trained run whose responses are (nearly) identical to its base model's on the
same items most likely did not get its adapter applied (or learned nothing): flag it.
"""
from __future__ import annotations

import math

import pandas as pd

COLUMNS = ("run_id", "model", "condition", "kind", "seed", "n_items", "n_changed", "share_changed", "flagged")


def _text(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def changed_share(generations: pd.DataFrame, runs: pd.DataFrame, min_share: float) -> pd.DataFrame:
    """Per trained run (every run whose kind is not "base"): on how many of the (suite, item_id)
    items it shares with its model's base run its response differs from the base response (exact
    string comparison; a missing response counts as empty).

    generations: run_id, suite, item_id, response. runs: run_id, model, condition, kind, seed.
    Returns COLUMNS; flagged = share_changed < min_share. A run without a base run of its model or
    without shared items has n_items 0, share_changed NaN and is not flagged (nothing to compare).
    """
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must be in [0, 1], got {min_share}")
    missing = [c for c in ("run_id", "suite", "item_id", "response") if c not in generations.columns]
    if missing:
        raise ValueError(f"generations lack column(s) {missing}")
    missing = [c for c in ("run_id", "model", "condition", "kind", "seed") if c not in runs.columns]
    if missing:
        raise ValueError(f"runs lack column(s) {missing}")
    keys = ["suite", "item_id"]
    g = generations[["run_id", *keys, "response"]].copy()
    g["response"] = g["response"].map(_text)
    dup = g.duplicated(["run_id", *keys])
    if dup.any():
        r = g[dup].iloc[0]
        raise ValueError(f"duplicate generation for ({r['run_id']}, {r['suite']}, {r['item_id']})")
    by_run = {rid: df for rid, df in g.groupby("run_id", sort=False)}
    base_of = {str(r.model): str(r.run_id) for r in runs.itertuples() if r.kind == "base"}
    rows = []
    for r in runs.itertuples():
        if r.kind == "base":
            continue
        n_items = n_changed = 0
        base_id = base_of.get(str(r.model))
        if base_id in by_run and r.run_id in by_run:
            m = by_run[r.run_id].merge(by_run[base_id], on=keys, suffixes=("", "_base"), how="inner")
            n_items = len(m)
            n_changed = int((m["response"] != m["response_base"]).sum())
        share = n_changed / n_items if n_items else float("nan")
        rows.append({"run_id": r.run_id, "model": r.model, "condition": r.condition, "kind": r.kind,
                     "seed": r.seed, "n_items": n_items, "n_changed": n_changed, "share_changed": share,
                     "flagged": bool(n_items and share < min_share)})
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    out["share_changed"] = out["share_changed"].astype(float)
    out["flagged"] = out["flagged"].astype(bool)
    return out
