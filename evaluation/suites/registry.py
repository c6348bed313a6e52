"""The suite registry. A suite is one module that registers a `Suite`: its items, its judges, its own
settings (the spec's `score.suites.<name>`), the LLM judge it needs and its size. Spec validation,
the pipeline, `valind plan`, `valind judge` and the report iterate the registry, so adding a suite
touches no other file; a suite in another package registers through the `valind.plugins` entry
point (evaluation.registry)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, Mapping, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict

from ..registry import Registry
from ..types import Engine

S = TypeVar("S", bound=BaseModel)

# A settings field naming a model the study serves as a judge: the runner lists, prepares and checks
# every such field (runner.spec_views.judge_fields), and a rehearsal swaps it for its tiny judge.
JUDGE_MODEL = "judge model"
JudgeModel = Annotated["str | None", JUDGE_MODEL]


class NoSettings(BaseModel):
    """The settings of a suite that has none: `score.suites.<name>: {}` only."""
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SuiteSettings:
    """What suites read from the spec: the study-wide part (the runner builds it from generate,
    annotate, score and controls) and each suite's own settings (`score.suites.<name>`)."""
    items_per_suite: int | None = None    # generate.items_per_suite
    seed: int = 0                         # generate.sampling.seed: which items are sampled
    max_tokens: int = 64                  # score.sampling.max_tokens: LLM judges' output budget
    annotate_judge: str | None = None     # annotate.judge_model: the labeller (a default judge)
    annotate_mode: str = "extract"        # annotate.mode: extract | logprob
    annotate_threshold: float = 0.5       # annotate.logprob_threshold
    planted_phrase: str | None = None     # controls.positive.phrase
    planted_items: int = 24               # controls.positive.items
    # suite -> its settings model's instance (score.suites.<suite>; the model's defaults when unset)
    suites: Mapping[str, BaseModel] = field(default_factory=dict)

    def of(self, suite: str, model: type[S]) -> S:
        """Suite `suite`'s own settings, as its settings model `model`."""
        got = self.suites.get(suite)
        if got is None:
            return model()
        if not isinstance(got, model):
            return model.model_validate(got if isinstance(got, Mapping) else got.model_dump())
        return got


def _no_judge(settings: SuiteSettings) -> None:
    return None


@dataclass(frozen=True)
class ExtraJudge:
    """An LLM judge a suite runs beside its own `judge`, on a model of its own (e.g. the safety suite's
    harm classifier): served, keyed and checked like `judge`; `score(items, generations, engine)` gives
    its score rows (SCORE_COLUMNS)."""
    model: str
    logprobs: bool                        # needs an engine that scores (log-probs)
    score: Callable[[pd.DataFrame, pd.DataFrame, Engine], pd.DataFrame]
    version: str = "1"                    # its module's VERSION: the score key holds it


def _no_extra(settings: SuiteSettings) -> Mapping[str, ExtraJudge]:
    return {}


def _capped(settings: SuiteSettings) -> int | None:
    return settings.items_per_suite


def _one(settings: SuiteSettings) -> int:
    return 1


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
    # Its own settings: the pydantic model of the spec's score.suites.<name> (extra keys refused)
    settings: type[BaseModel] = NoSettings
    # The LLM judge it needs: (model name, needs log-probs), or None. Every judge model the study
    # serves is the labeller's or one of these (runner.spec.Spec.judge_models).
    judge: Callable[[SuiteSettings], tuple[str, bool] | None] = _no_judge
    # Further LLM judges, each on a model of its own: name -> ExtraJudge (runner.spec_views.llm_judges
    # lists them with `judge` as "<suite>/<name>")
    extra_judges: Callable[[SuiteSettings], Mapping[str, ExtraJudge]] = _no_extra
    # The spec section whose `engine` serves its LLM judge (falling back to the top-level `engine`)
    engine: str = "annotate"
    judge_requests: Callable[[SuiteSettings], int] = _one  # per item, for `valind plan`
    held_out: bool = False                # items come from the curation's held-out prompts (added to n_items)
    limit: Callable[[SuiteSettings], int | None] = _capped
    # None: users list it in generate.suites; else it runs whenever this says so (and cannot be listed)
    enabled: Callable[[SuiteSettings], bool] | None = None
    # A second turn for items whose `needs_followup` is set: (item row, first response) -> messages
    followup: Callable[[pd.Series, str], list[dict[str, str]]] | None = None
    n_followups: int = 0                  # items needing a follow-up in its data, for `valind plan`
    # Bump when its items or scoring change; compose it with the versions of the judges it calls
    # (evaluation.judges.version). Item and score keys hold it, so cached units are redone.
    version: str = "1"


SUITES: Registry[Suite] = Registry("suite", builtins="evaluation.suites")


def register(suite: Suite) -> Suite:
    return SUITES.add(suite.name, suite)


def get(name: str) -> Suite:
    return SUITES.get(name)


def listable(plugins: bool = True) -> list[str]:
    """Suites a spec may list in generate.suites; `plugins=False`: the built-in ones (what runs when
    a spec lists none: installing a plugin does not change an existing study)."""
    return [n for n, s in SUITES.items() if s.enabled is None and (plugins or SUITES.plugin(n) is None)]

