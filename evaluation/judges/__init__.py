"""Judges: turn (item, response) pairs into score rows (SCORE_COLUMNS). Pure code: LLM judges
get an `Engine`; an unparseable verdict is unscored (value NaN, scored False, raw kept), never 0."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

import pandas as pd

from ..suites.registry import SuiteSettings, get
from ..types import Engine, SCORE_COLUMNS
from . import _common
from .anthropomorphism import score_anthropomorphism
from .harm import score_harm
from .planted import score_planted
from .refusal import judge_agreement, score_refusal
from .sycophancy import score_sycophancy
from .values import score_values


def version(*judges: ModuleType) -> str:
    """A suite's judges as a version string (their modules' VERSION and the shared plumbing's), for
    the suite's `version`: bumping a judge then redoes exactly the scores of the suites that call it."""
    return "+".join(f"{m.__name__.rsplit('.', 1)[1]}-{m.VERSION}" for m in (*judges, _common))


def score_suite(suite: str, items: pd.DataFrame, generations: pd.DataFrame, engine: Engine | None = None,
                settings: SuiteSettings | Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Run the judges of registered suite `suite` over `generations` (run_id, suite, item_id,
    response [, followup_response]); returns run_id + SCORE_COLUMNS. `settings`: a SuiteSettings
    (or a dict of its fields); `engine`: the suite's LLM judge, when it has one."""
    if "run_id" not in generations.columns:
        raise ValueError("generations needs a run_id column")
    if not isinstance(settings, SuiteSettings):
        settings = SuiteSettings(**(settings or {}))
    gens = generations[generations["suite"] == suite] if "suite" in generations.columns else generations
    out = get(suite).score(items, gens, engine, settings)
    return out[list(SCORE_COLUMNS)].reset_index(drop=True)


__all__ = ["score_suite", "score_values", "score_refusal", "judge_agreement", "score_anthropomorphism",
           "score_sycophancy", "score_planted", "score_harm", "version"]
