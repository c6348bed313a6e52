"""What each condition's training pairs carry, value beside its controls: size, source mix, flip share
and length profile (the report's "Conditions side by side" table), and the check that every matched
control ("control-<v>-<k>", controls.match: per_value) carries what its value subset carries."""
from __future__ import annotations

import numpy as np
import pandas as pd

from runner.spec import parse_condition

COLUMNS = ["condition", "matches", "pairs", "sources", "flipped", "flip_share", "length_median", "length_q1",
           "length_q3"]


def source_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Pairs per source (one "all" stratum for a frame without a source column), sources sorted."""
    if "source" not in frame.columns:
        return {"all": len(frame)} if len(frame) else {}
    return {str(k): int(n) for k, n in sorted(frame["source"].astype(str).value_counts().items())}


def _flipped(frame: pd.DataFrame) -> int | None:
    return int(frame["flipped"].sum()) if "flipped" in frame.columns else None


def _flips_by_source(frame: pd.DataFrame) -> dict[str, int] | None:
    return source_counts(frame[frame["flipped"].astype(bool)]) if "flipped" in frame.columns else None


def _order(names: list[str]) -> list[str]:
    """Each value, then its matched controls; then the positive arm; then pooled controls."""
    parsed = {c: parse_condition(c) for c in names}
    out = []
    for c in names:
        kind, value, _ = parsed[c]
        if kind == "value":
            out += [c] + sorted(m for m in names if parsed[m][0] == "control" and parsed[m][2] == value)
    out += [c for c in names if parsed[c][0] == "positive"]
    return out + sorted(c for c in names if c not in out)


def condition_table(subsets: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per condition (value and its controls interleaved): its pairs, source mix ("src n, ..."),
    flipped pairs and their share (None where the frame has no flips: pooled controls, the positive arm),
    and the median and quartiles of its lengths (the `length` column curation adds)."""
    rows = []
    for c in _order(list(subsets)):
        f = subsets[c]
        kind, value, match = parse_condition(c)
        n, flipped = len(f), _flipped(f)
        q1, med, q3 = (np.quantile(f["length"], [0.25, 0.5, 0.75]) if n and "length" in f.columns
                       else (np.nan, np.nan, np.nan))
        rows.append({"condition": c, "matches": value or match or "", "pairs": n,
                     "sources": ", ".join(f"{s} {k}" for s, k in source_counts(f).items()),
                     "flipped": flipped, "flip_share": None if flipped is None or not n else flipped / n,
                     "length_median": float(med), "length_q1": float(q1), "length_q3": float(q3)})
    return pd.DataFrame(rows, columns=COLUMNS)


def mismatches(subsets: dict[str, pd.DataFrame]) -> list[str]:
    """Where a matched control ("control-<v>-<k>") does not carry what value-<v> carries: another size,
    another number of flipped pairs from any source, or another count of pairs from any source."""
    problems = []
    for c, f in subsets.items():
        kind, _, value = parse_condition(c)
        if kind != "control" or value is None:
            continue
        own = subsets.get(f"value-{value}")
        if own is None:
            problems.append(f"{c}: no subset value-{value} to match")
            continue
        if len(f) != len(own):
            problems.append(f"{c}: {len(f)} pairs, value-{value} has {len(own)}")
        if _flipped(f) != _flipped(own) or _flips_by_source(f) != _flips_by_source(own):
            problems.append(f"{c}: flipped pairs per source {_flips_by_source(f)}, value-{value} has "
                            f"{_flips_by_source(own)}")
        if source_counts(f) != source_counts(own):
            problems.append(f"{c}: sources {source_counts(f)}, value-{value} has {source_counts(own)}")
    return problems
