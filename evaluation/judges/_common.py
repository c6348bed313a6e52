"""Plumbing shared by the judges: chat and text normalisation, the yes/no log-prob judge, joining
items to generations, score rows."""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Sequence

import pandas as pd

from ..types import SCORE_COLUMNS, Engine, ScoreRequest

# Bump when the shared plumbing changes what any judge scores (the yes/no judge, joins, rows).
VERSION = "1"

NAN = float("nan")
_THINK_RE = re.compile(r"<thinking>.*?(</thinking>|$)", re.S | re.I)


def as_chat(messages: Any) -> tuple[dict[str, Any], ...]:
    """A messages cell (list, tuple, numpy array after parquet, or JSON string) -> tuple of dicts."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    return tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)


def strip_thinking(text: str) -> str:
    """Drop <thinking>…</thinking> blocks (an unclosed one runs to the end)."""
    return _THINK_RE.sub(" ", text or "")


def straight_apostrophes(text: str | None, left_quote: bool = False) -> str:
    """`text` (None -> "") with the typographic apostrophe U+2019 as "'", and with `left_quote`
    also U+2018: curly apostrophes would defeat phrase lists written with "i'm", "can't"."""
    t = (text or "").replace("\u2019", "'")
    return t.replace("\u2018", "'") if left_quote else t


def render(messages: Iterable[dict[str, Any]], response: str | None = None) -> str:
    """A chat as plain text for a judge prompt ("User: …\\n\\nAI: …")."""
    names = {"user": "User", "assistant": "AI", "system": "System"}
    turns = [f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    if response is not None:
        turns.append(f"AI: {response}")
    return "\n\n".join(turns)


# The yes/no log-prob judge: a question whose answer is scored as the continuations " Yes" and
# " No"; the engine returns log P(continuation | chat), and the verdict compares the two.
YES, NO = " Yes", " No"


def yes_no_requests(messages: Sequence[dict[str, Any]]) -> list[ScoreRequest]:
    """The two ScoreRequests of one yes/no question: continuation " Yes", then " No"."""
    msgs = tuple(messages)
    return [ScoreRequest(messages=msgs, continuation=YES), ScoreRequest(messages=msgs, continuation=NO)]


def score_yes_no(engine: Engine, questions: Sequence[Sequence[dict[str, Any]]],
                 desc: str | None = None) -> list[tuple[float, float]]:
    """(log P(" Yes"), log P(" No")) per question chat, in one `engine.score` call.

    `desc` is passed on (a progress label, as the runner's EnginePool takes it) only when given:
    a plain `Engine.score(requests)` takes no keyword."""
    reqs = [r for q in questions for r in yes_no_requests(q)]
    lps = engine.score(reqs) if desc is None else engine.score(reqs, desc=desc)  # type: ignore[call-arg]
    if len(lps) != len(reqs):
        raise ValueError(f"the engine returned {len(lps)} log-probs for {len(reqs)} requests")
    return [(float(lps[2 * i]), float(lps[2 * i + 1])) for i in range(len(questions))]


def p_yes(logp_yes: float, logp_no: float) -> float:
    """P(yes) as the softmax over the two answers; NaN when either log-prob is not finite."""
    y, n = float(logp_yes), float(logp_no)
    if not (math.isfinite(y) and math.isfinite(n)):
        return NAN
    m = max(y, n)
    return math.exp(y - m) / (math.exp(y - m) + math.exp(n - m))


def yes_no_raw(logp_yes: float, logp_no: float) -> str:
    """The `raw` cell of a yes/no verdict."""
    return f"logp_yes={logp_yes:.4f};logp_no={logp_no:.4f}"


def join(items: pd.DataFrame, generations: pd.DataFrame) -> pd.DataFrame:
    """Generations with their item's columns (inner join on item_id, and suite when both have it).
    Item columns win over same-named generation columns (e.g. a stray `messages`)."""
    keys = ["item_id"] + (["suite"] if "suite" in items.columns and "suite" in generations.columns else [])
    g = generations.drop(columns=[c for c in items.columns if c in generations.columns and c not in keys])
    return g.merge(items, on=keys, how="inner", validate="many_to_one")


def row(g: Any, metric: str, value: float | None, judge: str, raw: str = "") -> dict[str, Any]:
    """One score row for generation `g` (a namedtuple/Series); value None or NaN -> unscored."""
    ok = value is not None and not (isinstance(value, float) and math.isnan(value))
    out = {"suite": g["suite"], "item_id": g["item_id"], "metric": metric,
           "value": float(value) if ok and value is not None else NAN, "scored": bool(ok), "judge": judge, "raw": str(raw)}
    if "run_id" in g:
        out = {"run_id": g["run_id"], **out}
    return out


def to_frame(rows: list[dict[str, Any]], with_run_id: bool) -> pd.DataFrame:
    cols = list(SCORE_COLUMNS if with_run_id else SCORE_COLUMNS[1:])
    df = pd.DataFrame(rows, columns=cols)
    df["value"] = df["value"].astype(float)
    df["scored"] = df["scored"].astype(bool)
    return df


def records(items: pd.DataFrame, generations: pd.DataFrame) -> tuple[list[dict[str, Any]], bool]:
    """Joined rows as dicts, and whether they carry run_id."""
    j = join(items, generations)
    return j.to_dict("records"), "run_id" in j.columns
