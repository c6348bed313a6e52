"""The judge registry: the judges `valind judge` offers on outside tables of (prompt, response) rows.
A judge module registers its own (`JUDGES.add`), with its version; a plugin's judges register the same
way (evaluation.registry)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from ..registry import Registry
from ..types import Engine

# (items, generations, engine or None) -> score rows (SCORE_COLUMNS)
Scorer = Callable[[pd.DataFrame, pd.DataFrame, "Engine | None"], pd.DataFrame]


@dataclass(frozen=True)
class Judge:
    name: str
    score: Scorer
    needs_model: bool                     # an LLM judge: `valind judge` needs --model
    version: str = "1"                    # its module's VERSION: scores it made are redone when bumped


JUDGES: Registry[Judge] = Registry("judge", builtins="evaluation.judges")


def register(judge: Judge) -> Judge:
    return JUDGES.add(judge.name, judge)


def external_judges() -> dict[str, tuple[bool, Scorer]]:
    """name -> (needs a model, scorer), for `valind judge`."""
    return {name: (j.needs_model, j.score) for name, j in JUDGES.items()}
