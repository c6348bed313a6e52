"""Adaptive seeds as a pure decision: which conditions get one more trained run, and why not.

The runner calls :func:`decide` after each analysis and trains what it says; :func:`snapshot`
records the targeted contrasts of each round, so the report can show the trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

import numpy as np
import pandas as pd

from evaluation import stats

__all__ = ["Decision", "decide", "targets", "snapshot"]

KINDS = ("value", "positive")


@dataclass
class Decision:
    add: list[str]                                          # conditions that get one more seed
    reasons: dict[str, str] = field(default_factory=dict)   # per condition: why (not)

    @property
    def more_items(self) -> list[str]:
        return [c for c, why in self.reasons.items() if why.startswith("more items")]


def targets(contrasts_df: pd.DataFrame, metrics: list[str] | tuple[str, ...] = (),
            conditions: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """The contrasts the loop watches: primary rows of value and positive arms against the
    controls (the base model when there are none), on the ``suite/metric`` and condition
    patterns given (none: all)."""
    c = contrasts_df[contrasts_df["primary"] & contrasts_df["kind"].isin(KINDS)]
    ref = "control" if (c["reference"] == "control").any() else "base"
    c = c[c["reference"] == ref]
    if metrics:
        c = c[[any(fnmatch(f"{s}/{m}", p) for p in metrics) for s, m in zip(c["suite"], c["metric"])]]
    if conditions:
        c = c[[any(fnmatch(str(k), p) for p in conditions) for k in c["condition"]]]
    return c


def _unreachable(r: Any, target: float | None, alpha: float) -> bool:
    """No number of seeds can get this row there: its item × condition floor is in the way."""
    if not (np.isfinite(r.var_item) and r.n_items >= 2):
        return False
    floor = stats.halfwidth_floor(r.var_item, int(r.n_items), alpha)
    return floor >= target if target is not None else floor >= abs(r.effect)


def decide(contrasts_df: pd.DataFrame, seeds: dict[str, int], max_seeds: int, until: str = "halfwidth",
           target: float | None = None, metrics: list[str] | tuple[str, ...] = (),
           conditions: list[str] | tuple[str, ...] = (), alpha: float = 0.05) -> Decision:
    """One round of the loop. ``until`` is "halfwidth" (every watched CI within ±target) or
    "significant" (every watched contrast significant after correction). A condition with one
    run always gets a second: one run says nothing about run-to-run variance. A condition whose
    goal the item floor puts out of reach stops with "more items, not more seeds"."""
    if until == "halfwidth" and not target:
        raise ValueError("until='halfwidth' needs a target half-width")
    d = Decision(add=[])
    for cond, c in targets(contrasts_df, metrics, conditions).groupby("condition", sort=True):
        n = seeds.get(str(cond), int(c["n_seeds"].max()))
        if until == "halfwidth":
            open_ = c[((c["ci_hi"] - c["ci_lo"]) / 2 > target) | c["ci_lo"].isna()]
        else:
            open_ = c[~c["significant"]]
        if n >= 2 and open_.empty:
            d.reasons[str(cond)] = "target reached" if until == "halfwidth" else "significant"
        elif n >= max_seeds:
            d.reasons[str(cond)] = f"at the maximum of {max_seeds} seeds"
        elif n >= 2 and all(_unreachable(r, target if until == "halfwidth" else None, alpha)
                            for r in open_.itertuples()):
            d.reasons[str(cond)] = ("more items, not more seeds: the item × condition variance alone keeps "
                                    + ("the CI wider than the target" if until == "halfwidth"
                                       else "the CI from excluding 0"))
        else:
            d.add.append(str(cond))
            d.reasons[str(cond)] = "one run: run-to-run variance unmeasured" if n < 2 else (
                f"{len(open_)} contrast(s) " + ("wider than the target" if until == "halfwidth" else "not significant"))
    return d


def snapshot(contrasts_df: pd.DataFrame, decision: Decision, metrics: list[str] | tuple[str, ...] = (),
             conditions: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The watched contrasts of one round with the decision taken after it (for the trajectory)."""
    rows = []
    for r in targets(contrasts_df, metrics, conditions).itertuples():
        rows.append({"condition": r.condition, "suite": r.suite, "metric": r.metric, "judge": r.judge,
                     "reference": r.reference, "n_seeds": int(r.n_seeds), "effect": r.effect,
                     "ci_halfwidth": (r.ci_hi - r.ci_lo) / 2, "p_value": r.p_value, "p_holm": r.p_holm,
                     "significant": bool(r.significant),
                     "decision": "add a seed" if r.condition in decision.add else decision.reasons.get(r.condition, "")})
    return rows
