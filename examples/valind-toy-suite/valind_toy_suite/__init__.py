"""`greeting`: a toy valind suite with a setting (`phrase`) and an LLM judge of its own.

Importing this module registers the suite and its judge (the `valind.plugins` entry point)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from evaluation.judges import _common
from evaluation.judges._common import p_yes, records, render, row, score_yes_no, to_frame, yes_no_raw
from evaluation.judges.registry import Judge, register as register_judge
from evaluation.suites import Suite, SuiteSettings, register
from evaluation.suites.registry import JudgeModel
from evaluation.types import Engine

SUITE = "greeting"
VERSION = "1"  # bump when the items or the scoring change: its item and score units are redone
PROMPTS = ("Hi! I just joined this chat.", "Good morning!", "Say hello to my friend Sam.",
           "I'm new in town. Greet me like a neighbour would.", "Hey there, how's it going?",
           "Welcome me to the team, please.")
QUESTION = "Is the AI's last reply a friendly greeting? Answer Yes or No."


class GreetingSettings(BaseModel):
    """score.suites.greeting."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    phrase: str = Field(default="hello", min_length=1)  # says_phrase: the response contains it (any case)
    judge: JudgeModel = None  # the LLM judge's model; None: the phrase check only


def load_items(data_dir: Path | None = None, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    items = pd.DataFrame({"suite": SUITE, "item_id": [f"{SUITE}/{i}" for i in range(len(PROMPTS))],
                          "messages": [[{"role": "user", "content": p}] for p in PROMPTS]})
    return items.head(limit) if limit else items


def score_llm(items: pd.DataFrame, generations: pd.DataFrame, engine: Engine) -> pd.DataFrame:
    """is_greeting: P(" Yes") to QUESTION about each response, > 0.5 (unscored when not finite)."""
    recs, with_run = records(items, generations)
    chats = [[{"role": "user", "content": f"{render(g['messages'], str(g['response']))}\n\n{QUESTION}"}]
             for g in recs]
    lps = score_yes_no(engine, chats) if recs else []
    rows = []
    for g, (y, n) in zip(recs, lps):
        p = p_yes(y, n)
        rows.append(row(g, "is_greeting", None if p != p else float(p > 0.5), "greeting-llm", yes_no_raw(y, n)))
    return to_frame(rows, with_run)


def _score(items: pd.DataFrame, generations: pd.DataFrame, engine: Engine | None,
           st: SuiteSettings) -> pd.DataFrame:
    phrase = st.of(SUITE, GreetingSettings).phrase.lower()
    recs, with_run = records(items, generations)
    frames = [to_frame([row(g, "says_phrase", float(phrase in str(g["response"]).lower()), "greeting-phrase")
                        for g in recs], with_run)]
    if engine is not None:
        frames.append(score_llm(items, generations, engine))
    return pd.concat(frames, ignore_index=True)


def _judge(st: SuiteSettings) -> tuple[str, bool] | None:
    model = st.of(SUITE, GreetingSettings).judge
    return (model, True) if model else None  # True: it reads log-probs


def _judges(st: SuiteSettings) -> dict[str, tuple[str, ...]]:
    own = {"says_phrase": ("greeting-phrase",)}
    return {**own, "is_greeting": ("greeting-llm",)} if _judge(st) else own


register(Suite(SUITE, load_items, _score, n_items=len(PROMPTS), judges=_judges, settings=GreetingSettings,
               judge=_judge, version=f"{VERSION}/common-{_common.VERSION}"))
register_judge(Judge("greeting-llm", lambda i, g, e: score_llm(i, g, e), needs_model=True, version=VERSION))
