"""The positive control's detector suite ("planted"): held-out preference prompts, on which a model
trained on pairs with a planted phrase should say the phrase and every other model should not.

Items are the curation's held-out pairs' prompts (the conversation up to the last user turn),
deduplicated, ranked by a hash of (seed, item id): the first `limit` of that order, so the set does
not depend on the held-out pairs' row order and grows by appending when `limit` grows."""
from __future__ import annotations

from typing import Any

import json
from pathlib import Path

import pandas as pd

from ._common import frame, short_hash, stable_key
from .registry import Suite, SuiteSettings, register
from ..judges import planted as planted_judge, version
from ..judges.planted import JUDGE, METRIC, score_planted
from ..types import Engine

SUITE = "planted"
COLUMNS = ("source",)


def load_items(data_dir: Path | None = None, limit: int | None = None, seed: int = 0,
               held_out_prompts: list[list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """`held_out_prompts`: chats (lists of {"role","content"}); trailing non-user turns are dropped.
    `data_dir` is unused (kept for the common signature)."""
    if not held_out_prompts:
        raise ValueError("the planted suite needs held-out prompts (data.held_out_fraction > 0, and "
                         "at least one pair held out)")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for chat in held_out_prompts:
        chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in chat]
        last_user = max((i for i, m in enumerate(chat) if m["role"] == "user"), default=None)
        if last_user is None:
            continue
        chat = chat[:last_user + 1]
        h = short_hash(json.dumps(chat, sort_keys=True))
        if h in seen:  # identical prompts would be identical items
            continue
        seen.add(h)
        rows.append({"item_id": f"planted/{h}", "messages": chat, "source": "held_out"})
    if not rows:
        raise ValueError("the planted suite got no held-out prompt with a user turn")
    rows.sort(key=lambda r: stable_key(seed, r["item_id"]))
    if limit is not None:
        rows = rows[:max(0, limit)]
    return frame(rows, SUITE, COLUMNS)


def _score(items: pd.DataFrame, gens: pd.DataFrame, engine: Engine | None, st: SuiteSettings) -> pd.DataFrame:
    if st.planted_phrase is None:
        raise ValueError("the planted judge needs settings.planted_phrase (controls.positive.phrase)")
    return score_planted(items, gens, st.planted_phrase)


# The positive control's detector: on whenever controls.positive is set; never listed by hand.
VERSION = f"1/{version(planted_judge)}"  # this suite's items and scoring, and its judges'

register(Suite(SUITE, load_items, _score, n_items=0, held_out=True, limit=lambda st: st.planted_items,
               judges=lambda st: {METRIC: (JUDGE,)}, version=VERSION,
               enabled=lambda st: st.planted_phrase is not None))
