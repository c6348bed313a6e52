"""The suite registry. A suite is one module that registers a `Suite`: its items, its judges, the
LLM judge it needs and its size. Spec validation, the pipeline, `valind plan`, `valind judge` and
the report iterate the registry, so adding a suite touches no other file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import pandas as pd

from ..types import Engine


@dataclass(frozen=True)
class SuiteSettings:
    """What suites read from the spec (the runner builds it from generate, score and controls)."""
    items_per_suite: int | None = None    # generate.items_per_suite
    seed: int = 0                         # generate.sampling.seed: which items are sampled
    max_tokens: int = 64                  # score.sampling.max_tokens: LLM judges' output budget
    values_mode: str = "extract"          # annotate.mode: extract | logprob
    values_threshold: float = 0.5         # annotate.logprob_threshold
    value_judge: str | None = None        # score.value_judge (default annotate.judge_model)
    refusal_judges: tuple[str, ...] = ("strmatch", "substring")
    refusal_llm_judge: str | None = None
    anthro_judge: str | None = None
    planted_phrase: str | None = None     # controls.positive.phrase
    planted_items: int = 24               # controls.positive.items


def _no_judge(settings: SuiteSettings) -> None:
    return None


def _capped(settings: SuiteSettings) -> int | None:
    return settings.items_per_suite


@dataclass(frozen=True)
class Suite:
    name: str
    # (data_dir, limit, seed[, held_out_prompts=...]) -> item table (ITEM_COLUMNS + metadata)
    load_items: Callable[..., pd.DataFrame]
    # (items, generations, engine or None, settings) -> score rows (SCORE_COLUMNS)
    score: Callable[[pd.DataFrame, pd.DataFrame, Engine | None, SuiteSettings], pd.DataFrame]
    n_items: int                          # items in its data before any cap, for `valind plan`
    # The metrics it scores and each one's judges, as score rows name them (an LLM judge's name is
    # the part before ":<engine>"); the spec checks analyze.primary_judges against it
    judges: Callable[[SuiteSettings], Mapping[str, tuple[str, ...]]]
    # The LLM judge it needs: (model name, needs log-probs), or None
    judge: Callable[[SuiteSettings], tuple[str, bool] | None] = _no_judge
    judge_requests: Callable[[SuiteSettings], int] = lambda st: 1  # per item, for `valind plan`
    held_out: bool = False                # items come from the curation's held-out prompts (added to n_items)
    limit: Callable[[SuiteSettings], int | None] = _capped
    # None: users list it in generate.suites; else it runs whenever this says so (and cannot be listed)
    enabled: Callable[[SuiteSettings], bool] | None = None
    # A second turn for items whose `needs_followup` is set: (item row, first response) -> messages
    followup: Callable[[pd.Series, str], list[dict]] | None = None
    n_followups: int = 0                  # items needing a follow-up in its data, for `valind plan`
    # Judges `valind judge` offers on outside tables: name -> (needs a model, scorer(items, gens, engine))
    external: Mapping[str, tuple[bool, Callable]] = field(default_factory=dict)
    # Bump when its items or scoring change; compose it with the versions of the judges it calls
    # (evaluation.judges.version). Item and score keys hold it, so cached units are redone.
    version: str = "1"


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    if suite.name in SUITES and SUITES[suite.name] != suite:
        raise ValueError(f"suite {suite.name!r} is registered twice")
    SUITES[suite.name] = suite
    return suite


def get(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return SUITES[name]


def listable() -> list[str]:
    """Suites a spec may list in generate.suites (and runs when it lists none)."""
    return [n for n, s in SUITES.items() if s.enabled is None]


def external_judges() -> dict[str, tuple[bool, Callable]]:
    return {name: j for s in SUITES.values() for name, j in s.external.items()}
