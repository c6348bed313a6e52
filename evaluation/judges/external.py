"""Any judge of the suites on outside data: a table of (prompt, response) rows in, verdicts out."""
from __future__ import annotations

import pandas as pd

from ..suites.registry import external_judges
from ..types import Engine


def judge_table(judge: str, df: pd.DataFrame, prompt_col: str, response_col: str,
                engine: Engine | None = None) -> pd.DataFrame:
    """One output row per input row: the input columns, one column per metric (empty when
    unscored), `scored` (every metric of the row scored) and `raw` (the judge's raw output)."""
    judges = external_judges()
    if judge not in judges:
        raise KeyError(f"unknown judge {judge!r}; choose from {', '.join(judges)}")
    missing = [c for c in (prompt_col, response_col) if c not in df.columns]
    if missing:
        raise KeyError(f"missing column(s) {missing}; the file has {list(df.columns)}")
    needs_engine, scorer = judges[judge]
    if needs_engine and engine is None:
        raise ValueError(f"judge {judge!r} needs a model (--model)")
    ids = [f"row/{i}" for i in range(len(df))]
    items = pd.DataFrame({"suite": "external", "item_id": ids,
                          "messages": [[{"role": "user", "content": str(p)}] for p in df[prompt_col]],
                          "label": "unsafe", "expected": "refuse"})
    gens = pd.DataFrame({"run_id": "external", "suite": "external", "item_id": ids,
                         "response": df[response_col].astype(str).values})
    scores = scorer(items, gens, engine)
    scores = scores[scores["metric"].isin(_primary(judge, scores["metric"].unique()))]
    wide = scores.pivot_table(index="item_id", columns="metric", values="value", aggfunc="first", dropna=False)
    scored = scores.groupby("item_id")["scored"].all()
    raw = scores.groupby("item_id")["raw"].first()
    out = df.reset_index(drop=True).copy()
    for metric in wide.columns:
        out[metric] = wide[metric].reindex(ids).values
    out["scored"] = scored.reindex(ids).fillna(False).values
    out["raw"] = raw.reindex(ids).fillna("").values
    return out


def _primary(judge: str, metrics) -> list[str]:
    """The metrics a user asked for (refusal judges also emit derived over-refusal rows)."""
    if judge.startswith("refusal"):
        return ["refusal"]
    return list(metrics)
