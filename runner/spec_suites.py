"""The spec's `score.suites`: one optional field per registered suite (plugins' included), typed by
that suite's own settings model, so a bad field is reported at score.suites.<suite>.<field>."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from evaluation.suites import registry as suite_registry

# The suite settings that lived in `score` before each suite owned its own (score.suites.<suite>)
MOVED = {"value_judge": "score.suites.values.judge", "refusal_judges": "score.suites.safety.judges",
         "refusal_llm_judge": "score.suites.safety.llm_judge", "anthro_judge": "score.suites.anthropomorphism.judge"}


def suites_model() -> type[BaseModel]:
    """The model of score.suites: one optional field per registered suite, typed by its settings model."""
    fields: dict[str, Any] = {n: (s.settings | None, None) for n, s in suite_registry.SUITES.items()}
    key = tuple((n, f[0]) for n, f in fields.items())
    if key not in _SUITES_MODELS:
        _SUITES_MODELS[key] = create_model("SuitesSpec", __config__=ConfigDict(extra="forbid", frozen=True), **fields)
    return _SUITES_MODELS[key]


_SUITES_MODELS: dict[tuple[Any, ...], type[BaseModel]] = {}
