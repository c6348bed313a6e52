"""Judges: turn (item, response) pairs into score rows (SCORE_COLUMNS). Pure code: LLM judges
get an `Engine`; an unparseable verdict is unscored (value NaN, scored False, raw kept), never 0."""
from __future__ import annotations

import pandas as pd

from ..types import Engine, SCORE_COLUMNS
from .anthropomorphism import score_anthropomorphism
from .planted import score_planted
from .refusal import judge_agreement, score_refusal
from .sycophancy import score_sycophancy
from .values import score_values


def score_suite(suite: str, items: pd.DataFrame, generations: pd.DataFrame, engine: Engine | None = None,
                settings: dict | None = None) -> pd.DataFrame:
    """Run the judges of `suite` over `generations` (run_id, suite, item_id, response
    [, followup_response]); returns run_id + SCORE_COLUMNS.

    settings (all optional):
      values: max_tokens (64), values_mode ("generate" | "logprob"), values_threshold (0.5);
      safety: refusal_judges (default strmatch + substring, + llm when an engine is given);
      anthropomorphism: anthro_llm (True: the rubric judge runs when an engine is given);
      planted: planted_phrase (required: the positive control's phrase; no engine).
    """
    s = dict(settings or {})
    if "run_id" not in generations.columns:
        raise ValueError("generations needs a run_id column")
    gens = generations[generations["suite"] == suite] if "suite" in generations.columns else generations
    if suite == "values":
        if engine is None:
            raise ValueError("the values judge needs an engine")
        out = score_values(items, gens, engine, max_tokens=int(s.get("max_tokens", 64)),
                           mode=s.get("values_mode", "generate"), threshold=float(s.get("values_threshold", 0.5)))
    elif suite == "safety":
        default = ["strmatch", "substring"] + (["llm"] if engine is not None else [])
        out = score_refusal(items, gens, judges=s.get("refusal_judges", default), engine=engine)
    elif suite == "anthropomorphism":
        out = score_anthropomorphism(items, gens, engine=engine, llm=bool(s.get("anthro_llm", True)))
    elif suite == "sycophancy":
        out = score_sycophancy(items, gens)
    elif suite == "planted":
        if "planted_phrase" not in s:
            raise ValueError("the planted judge needs settings['planted_phrase'] (controls.positive.phrase)")
        out = score_planted(items, gens, s["planted_phrase"])
    else:
        raise KeyError(f"unknown suite {suite!r}")
    return out[list(SCORE_COLUMNS)].reset_index(drop=True)


__all__ = ["score_suite", "score_values", "score_refusal", "judge_agreement", "score_anthropomorphism",
           "score_sycophancy", "score_planted"]
