"""seeds.adaptive's state in the study directory: the seeds added per condition (seeds.json) and
every round's watched contrasts (trajectory.json), under a key of the spec that wrote them
(stages/adaptive/<key>/), so a spec without seeds.adaptive, or another spec, never reads them. The
decision itself is evaluation.adaptive.decide, a pure function."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from evaluation.adaptive import decide, snapshot
from runner.spec import parse_condition
from runner.stages.keys import ADAPTIVE
from runner.store import read_state, write_json


class SeedBook:
    def __init__(self, spec, root: Path):
        self.spec = spec
        self.dir = Path(root) / "stages" / "adaptive" / ADAPTIVE.compute(SimpleNamespace(spec=spec))
        extra = read_state(self.dir / "seeds.json", {}) if spec.seeds.adaptive else {}
        self.extra: dict[str, list[int]] = extra if isinstance(extra, dict) else {}

    def seeds(self, condition: str) -> list[int]:
        return list(self.spec.seeds.values) + self.extra.get(condition, [])

    def add(self, conditions: list[str]) -> int:
        """One more seed for these conditions and for the controls they are compared with (they stay
        paired by seed): every control; with controls.match: per_value, a value's own controls
        (and every control for the positive arm, whose reference they all are)."""
        used = set(self.spec.seeds.values) | {x for v in self.extra.values() for x in v}
        seed = max(used) + 1
        parsed = [parse_condition(c) for c in conditions]
        every = any(kind == "positive" for kind, _, _ in parsed)
        induced = {value for _, value, _ in parsed}

        def reference(cond: str) -> bool:
            kind, _, match = parse_condition(cond)
            return kind == "control" and (match is None or every or match in induced)

        targets = set(conditions) | {c for c in self.spec.conditions() if reference(c)}
        for cond in sorted(targets):
            self.extra.setdefault(cond, []).append(seed)
        write_json(self.extra, self.dir / "seeds.json")
        return seed

    def decide(self, con: pd.DataFrame):
        """seeds.adaptive's decision after one analysis, and the round's watched contrasts."""
        ad = self.spec.seeds.adaptive
        n = {c: len(self.seeds(c)) for c in self.spec.conditions()}
        decision = decide(con, n, ad.max, ad.until, ad.target_ci_halfwidth, ad.metrics, ad.conditions,
                          self.spec.analyze.alpha)
        return decision, snapshot(con, decision, ad.metrics, ad.conditions)

    def _rounds(self) -> dict[str, list[dict]]:
        rounds = read_state(self.dir / "trajectory.json", {})
        return rounds if isinstance(rounds, dict) else {}

    def trajectory(self, con: pd.DataFrame, round_key: str) -> pd.DataFrame | None:
        """The watched contrasts of every round so far, this one (`round_key`) included."""
        if not self.spec.seeds.adaptive:
            return None
        _, now = self.decide(con)
        return pd.DataFrame([r for k, rs in self._rounds().items() if k != round_key for r in rs] + now)

    def record(self, con: pd.DataFrame, round_key: str) -> tuple[list[str], dict[str, str]]:
        """Record one round; the conditions that get a seed, and why each other one stops."""
        decision, rows = self.decide(con)
        rounds = self._rounds()
        rounds[round_key] = rows
        write_json(rounds, self.dir / "trajectory.json")
        return decision.add, {c: why for c, why in decision.reasons.items() if c not in decision.add}

    def note(self) -> str | None:
        ad = self.spec.seeds.adaptive
        if not ad:
            return None
        what = "; ".join(f"{c}: {', '.join(map(str, s))}" for c, s in sorted(self.extra.items())) or "none yet"
        goal = (f"every watched CI within ±{ad.target_ci_halfwidth}" if ad.until == "halfwidth"
                else "every watched contrast significant after correction")
        return f"seeds.adaptive: until {goal}, at most {ad.max} seeds per condition. Seeds added so far: {what}."
