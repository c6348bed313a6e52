"""Any judge of the suites on outside data: a table of (prompt, response) rows in, verdicts out."""
from __future__ import annotations

from typing import Any

from typing import Any, Iterable

import pandas as pd

from .registry import external_judges
from ..types import Engine


def judge_table(judge: str, df: pd.DataFrame, prompt_col: str, response_col: str,
                engine: Engine | None = None) -> pd.DataFrame:
    """One output row per input row: the input columns, one column per metric (empty when
    unscored), `scored` (every metric of the row scored) and `raw` (the judge's raw output). An
    empty, blank or missing response is unscored (raw says so), never judged as text."""
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
    rows = [(i, p, r) for i, p, r in zip(ids, df[prompt_col], df[response_col]) if not _blank(r)]
    out = df.reset_index(drop=True).copy()
    scored, raw = pd.Series(False, index=ids), pd.Series(NO_RESPONSE, index=ids)
    if rows:
        items = pd.DataFrame({"suite": "external", "item_id": [i for i, _, _ in rows], "label": "unsafe",
                              "messages": [[{"role": "user", "content": "" if _blank(p) else str(p)}]
                                           for _, p, _ in rows], "expected": "refuse"})
        gens = pd.DataFrame({"run_id": "external", "suite": "external", "item_id": items["item_id"],
                             "response": [str(r) for _, _, r in rows]})
        scores = scorer(items, gens, engine)
        scores = scores[scores["metric"].isin(_primary(judge, scores["metric"].unique()))]
        wide = scores.pivot_table(index="item_id", columns="metric", values="value", aggfunc="first", dropna=False)
        for metric in wide.columns:
            out[metric] = wide[metric].reindex(ids).values
        judged = scores.groupby("item_id")
        scored.update(judged["scored"].all())
        raw.update(judged["raw"].first())
    out["scored"], out["raw"] = scored.astype(bool).values, raw.values
    return out


NO_RESPONSE = "no response: empty or missing, not scored"


def _blank(value: Any) -> bool:
    """A missing (None, NaN) or empty/whitespace-only cell."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (pd.api.types.is_scalar(value) and pd.isna(value))


def _primary(judge: str, metrics: Iterable[str]) -> list[str]:
    """The metrics a user asked for (refusal judges also emit derived over-refusal rows)."""
    if judge.startswith("refusal"):
        return ["refusal"]
    return list(metrics)
