"""The study spec: the `Spec` model over its sections (runner.spec_sections), validation with YAML
paths, loading and hashing."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from evaluation.errors import InputError, short_repr
from evaluation.judges.refusal import METRICS as REFUSAL_METRICS
from runner import spec_checks, spec_views
from runner.spec_checks import _loc
from runner.spec_views import eval_suites as eval_suites, suite_settings as suite_settings  # re-exported
from evaluation.types import VALUES  # noqa: F401  (the closed value list, defined once; re-exported here)
# each section is read as runner.spec.<Section> too
from runner.spec_eval import (  # noqa: F401
    AnalyzeSpec, ClusterSpec, GenerateSpec, PlanSpec, ScoreSpec, TrackingSpec)
from runner.spec_sections import (  # noqa: F401
    SEED_MAX, AdaptiveSeeds, ControlsSpec, DataSpec, EngineSpec, JudgeSampling, ModelSpec, PositiveControlSpec,
    SamplingSpec, Seed, SeedsSpec, SourceSpec, StudySpec, Value, ValuesSpec, _Section)
from runner.spec_train import POSITIVE_SYSTEM_PROMPT, AnnotateCheck, AnnotateSpec, LoraSpec, TrainSpec  # noqa: F401
from runner.spec_train import system_fields as system_fields  # re-exported (runner.stages.analyze)


class Spec(_Section):
    study: StudySpec
    models: list[ModelSpec] = Field(min_length=1)
    values: ValuesSpec
    controls: ControlsSpec = ControlsSpec()
    seeds: SeedsSpec = SeedsSpec()
    data: DataSpec
    annotate: AnnotateSpec
    train: TrainSpec = TrainSpec()
    engine: EngineSpec = EngineSpec()
    generate: GenerateSpec = GenerateSpec()
    score: ScoreSpec = ScoreSpec()
    analyze: AnalyzeSpec = AnalyzeSpec()
    tracking: TrackingSpec = TrackingSpec()
    plan: PlanSpec = PlanSpec()
    cluster: ClusterSpec | None = None

    @model_validator(mode="after")
    def _unique_model_names(self) -> "Spec":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        return self

    # --- derived views -------------------------------------------------------------
    def conditions(self, values: list[str] | None = None) -> list[str]:
        """Value conditions, then the positive control (when set), then the random controls
        ("control-<k>", or "control-<value>-<k>" with controls.match: per_value). `values`: the
        induced values that have runs (default: all; under data.subset_size: all, curation's kept ones)."""
        vals = [v for v in self.values.induced if values is None or v in values]
        c = self.controls
        controls = ([f"control-{v}-{k}" for v in vals for k in range(c.count)] if c.match == "per_value"
                    else [f"control-{k}" for k in range(c.count)])
        return [f"value-{v}" for v in vals] + (["positive"] if c.positive is not None else []) + controls

    def model(self, name_or_path: str) -> ModelSpec:
        for m in self.models:
            if m.name == name_or_path:
                return m
        return ModelSpec(name=_slug(name_or_path), path=name_or_path)

    def output_dir(self, base: Path | None = None) -> Path:
        out = Path(self.study.output_dir).expanduser()
        if not out.is_absolute() and base is not None:
            out = base / out
        return (out / self.study.name).resolve()

    def data_dir(self) -> Path | None:
        d = os.environ.get("VALIND_DATA_DIR") or self.data.data_dir
        return Path(d).expanduser().resolve() if d else None

    def annotate_judges(self) -> list[str]:
        """The models that annotate: the labeller, then annotate.check's judge."""
        a = self.annotate
        return [a.judge_model] + ([a.check.judge_model] if a.check else [])

    def judge_models(self) -> set[str]:
        """Every judge model the study serves: the labellers and each suite's (runner.spec_views)."""
        return set(spec_views.judge_sections(self))

    def engine_for(self, model: str) -> tuple[str, EngineSpec]:
        """The engine section serving a model, and its YAML path (runner.spec_views.engine_for)."""
        return spec_views.engine_for(self, model)

    def section_engine(self, section: str) -> EngineSpec:
        """`<section>.engine`, else `engine` ("annotate": the judges', "generate": the evaluated models')."""
        return spec_views.section_engine(self, section)

    def primary_judges(self) -> dict[str, str]:
        """analyze.primary_judges, then safety's default for its refusal metrics (the first of its
        refusal judges) where no key of the spec's names it: for each metric the first matching key
        wins, so the default comes last and never hides a user's key. (Per metric, not "safety": the
        harm classifier's metric has a judge of its own.)"""
        keys = dict(self.analyze.primary_judges)
        for metric in REFUSAL_METRICS:
            keys.setdefault(f"safety/{metric}", self.score.safety.judges[0])
        return keys


def parse_condition(condition: str) -> tuple[str, str | None, str | None]:
    """(kind, induced value, matched value) of a condition name from `Spec.conditions()`:
    "value-<v>" → ("value", v, None); "control-<k>" → ("control", None, None); "control-<v>-<k>" →
    ("control", None, v) (split at the last "-": values such as open-mindedness hold hyphens);
    "positive" → ("positive", None, None); "prompt-<v>" (controls.prompt_only, untrained) → ("prompt", v, None)."""
    kind, _, rest = condition.partition("-")
    if kind in ("value", "prompt") and rest:
        return kind, rest, None
    if kind == "control" and rest:
        match, _, k = rest.rpartition("-")
        if k.isdigit():
            return "control", None, match or None
    if condition == "positive":
        return "positive", None, None
    raise ValueError(f"not a condition name: {condition!r}")


def condition_value(condition: str) -> str | None:
    """The value a trained condition is tied to (its system prompt's {value}): the induced value, or a
    matched control's; None for pooled controls and the positive control."""
    _, value, match = parse_condition(condition)
    return value or match


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-.")[-64:] or "model"


class SpecError(InputError):
    """An invalid spec: `problems` holds (yaml path, message) for every problem found."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source, self.problems = source, problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        # one line per problem, whatever the message holds (YAML errors span lines)
        lines += [f"  {path or '<root>'}: {' '.join(str(msg).split())}" for path, msg in self.problems]
        return "\n".join(lines)


def parse_spec(data: Any, source: str = "<spec>", spec_dir: Path | None = None) -> Spec:
    """The validated spec; `spec_dir` is the folder relative file paths in it are read from (the spec
    file's; None: the working directory)."""
    if not isinstance(data, dict):
        raise SpecError(source, [("", f"the spec must be a YAML mapping, got {type(data).__name__}")])
    try:
        spec = Spec.model_validate(data, context={"spec_dir": spec_dir})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden" and tuple(err["loc"][:2]) == ("score", "suites") and len(err["loc"]) == 3:
                msg = f"unknown suite; known: {', '.join(spec_views.suite_registry.SUITES.names())}"
            elif err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "literal_error":
                msg = f"{msg} (got {short_repr(err.get('input'))})"
            problems.append((_loc(err["loc"]), msg))
        raise SpecError(source, problems) from None
    problems = _cross_checks(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def _cross_checks(spec: Spec) -> list[tuple[str, str]]:
    """Checks that span sections (pydantic stops model validators at the first field error)."""
    problems = []
    size = spec.data.subset_size
    if isinstance(size, int) and size < spec.data.min_subset_size:
        problems.append(("data.subset_size", f"must be >= data.min_subset_size ({spec.data.min_subset_size})"))
    if size == "all" and spec.controls.match != "per_value":
        problems.append(("controls.match", "data.subset_size: all gives value subsets of unequal sizes, so each "
                                           "needs controls of its own size and length profile: set "
                                           "controls.match: per_value"))
    if spec.annotate.check and spec.annotate.check.judge_model == spec.annotate.judge_model:
        problems.append(("annotate.check.judge_model", "is annotate.judge_model: the check needs another judge"))
    if len(set(spec.seeds.values)) != len(spec.seeds.values):
        problems.append(("seeds.values", "seeds must be unique"))
    if spec.seeds.adaptive and spec.seeds.adaptive.max < len(spec.seeds.values):
        problems.append(("seeds.adaptive.max", f"must be >= the number of seeds ({len(spec.seeds.values)})"))
    if spec.controls.aa_check and spec.controls.count < 2:
        problems.append(("controls.aa_check", "needs controls.count >= 2 (two control arms to compare)"))
    if spec.controls.positive is not None and spec.data.held_out_fraction == 0:
        problems.append(("controls.positive", "needs data.held_out_fraction > 0 (its suite is held-out prompts)"))
    if spec.seeds.adaptive and max(spec.seeds.values) + spec.seeds.adaptive.max > SEED_MAX:
        problems.append(("seeds.adaptive.max", f"added seeds count up from the largest of seeds.values and could pass "
                                               f"{SEED_MAX}"))
    problems += _system_prompt_checks(spec)
    return problems + spec_checks.budget_problems(spec) + spec_checks.primary_judge_problems(spec)


def _system_prompt_checks(spec: Spec) -> list[tuple[str, str]]:
    """A {value} template needs a value for every trained condition but the positive arm (which gets
    POSITIVE_SYSTEM_PROMPT): controls matched per value; generate.system_prompt: train needs a training one."""
    problems = []
    sp = spec.train.system_prompt
    if sp is not None and system_fields(sp):
        if any(c.startswith("control-") and condition_value(c) is None for c in spec.conditions()):
            problems.append(("train.system_prompt", "a {value} template gives each condition its value's text, "
                             "and pooled random controls (control-<k>) have no value: use a fixed text or "
                             "controls.match: per_value (each control then gets its matched value's text)"))
    if spec.controls.prompt_only and sp is None:
        problems.append(("controls.prompt_only", "the prompt-only arm generates with each value's training system "
                         "prompt, and train.system_prompt is not set"))
    if spec.generate.system_prompt == "train" and sp is None:
        problems.append(("generate.system_prompt", "\"train\" generates with the training system prompt, and "
                         "train.system_prompt is not set"))
    return problems


def training_system_prompt(train: TrainSpec, condition: str) -> str | None:
    """The system prompt a condition trains with: its value's text; the positive arm's under a {value}
    template is the fixed POSITIVE_SYSTEM_PROMPT (runner.spec_train)."""
    return train.system_text(condition_value(condition), positive=condition == "positive")


def generation_system_prompt(spec: Spec, condition: str, trained: bool) -> str | None:
    """The system prompt a run generates with (generate.system_prompt): a trained run's own training
    text; a base model's only when train.system_prompt is a fixed text (a template has no value for it)."""
    sp = spec.train.system_prompt
    if spec.generate.system_prompt == "none" or sp is None:
        return None
    if trained:
        return training_system_prompt(spec.train, condition)
    return None if system_fields(sp) else spec.train.system_text(None)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(str(path), [("", f"cannot read the spec: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), [("", f"not a UTF-8 text file (byte {e.start}: {e.reason})")]) from None
    try:
        data, duplicates = spec_checks.load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(str(path), [("", f"not valid YAML{where}: {getattr(e, 'problem', e)}")]) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # PyYAML's constructors raise these for e.g. an impossible date (2020-99-99) or deep nesting
        raise SpecError(str(path), [("", f"not valid YAML: {type(e).__name__}: {e}")]) from None
    try:
        spec = parse_spec(data, str(path), spec_dir=path.resolve().parent)
    except SpecError as e:
        raise SpecError(str(path), duplicates + e.problems) from None
    if duplicates:
        raise SpecError(str(path), duplicates)
    return spec


def content_hash(*parts: Any, n: int = 16) -> str:
    """A stable hash of JSON-able parts (pydantic models are dumped in JSON mode)."""
    def norm(p: Any) -> Any:
        if isinstance(p, BaseModel):
            return p.model_dump(mode="json")
        if isinstance(p, (list, tuple)):
            return [norm(x) for x in p]
        if isinstance(p, dict):
            return {str(k): norm(v) for k, v in p.items()}
        if isinstance(p, Path):
            return str(p)
        return p
    blob = json.dumps([norm(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]
