"""Views the stages derive from a spec through the suite registry: what the suites read, which suites
run, every judge model and the spec field that names it, and the engine section serving a model (the
one place `<section>.engine or engine` is decided)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from evaluation.suites import registry as suite_registry

if TYPE_CHECKING:
    from runner.spec import Spec
    from runner.spec_sections import EngineSpec



def suite_settings(spec: Spec) -> suite_registry.SuiteSettings:
    """What the suites read from the spec, in one typed object (each suite's own settings included)."""
    pos = spec.controls.positive
    return suite_registry.SuiteSettings(
        items_per_suite=spec.generate.items_per_suite, seed=spec.generate.sampling.seed,
        max_tokens=spec.score.sampling.max_tokens, annotate_judge=spec.annotate.judge_model,
        annotate_mode=spec.annotate.mode, annotate_threshold=spec.annotate.logprob_threshold,
        suites={n: spec.score.suite(n) for n in suite_registry.SUITES.names()},
        **({"planted_phrase": pos.phrase, "planted_items": pos.items} if pos else {}))


def eval_suites(spec: Spec) -> list[str]:
    """The suites every run is generated and scored on: those listed, then those the spec turns on
    (the positive control's "planted")."""
    st = suite_settings(spec)
    return list(spec.generate.suites) + [n for n, s in suite_registry.SUITES.items() if s.enabled and s.enabled(st)]


def model_fields(settings: type[BaseModel]) -> list[str]:
    """The fields of a suite's settings model that name a judge model (`Annotated[str | None,
    JUDGE_MODEL]`)."""
    return [n for n, f in settings.model_fields.items() if suite_registry.JUDGE_MODEL in f.metadata]


def judge_fields(spec: Spec) -> dict[str, str]:
    """YAML path -> model, for every field of the spec that names a judge model (set ones only)."""
    a, check = spec.annotate, spec.score.check
    out = {"annotate.judge_model": a.judge_model, **({"annotate.check.judge_model": a.check.judge_model}
                                                     if a.check else {}),
           **({"score.check.judge_model": check.judge_model} if check else {})}
    for name, conf in spec.score.suites.items():
        for f in model_fields(type(conf)):
            if model := getattr(conf, f):
                out[f"score.suites.{name}.{f}"] = model
    return out


def llm_judges(spec: Spec) -> dict[str, tuple[str, bool]]:
    """Every LLM judge the evaluated suites run -> (model, needs log-probs): a suite's own `judge` as
    "<suite>", its extra judges (Suite.extra_judges) as "<suite>/<name>"."""
    st = suite_settings(spec)
    out: dict[str, tuple[str, bool]] = {}
    for name in eval_suites(spec):
        suite = suite_registry.get(name)
        if (judge := suite.judge(st)) and judge[0]:
            out[name] = judge
        out.update({f"{name}/{k}": (x.model, x.logprobs) for k, x in suite.extra_judges(st).items() if x.model})
    return out


def judge_sections(spec: Spec) -> dict[str, list[str]]:
    """Every judge model the study serves -> the spec sections whose `engine` may serve it: the
    labellers' "annotate", each suite's LLM judges its suite's `engine` section."""
    out: dict[str, list[str]] = {m: ["annotate"] for m in judge_fields(spec).values()}
    for name, (model, _) in llm_judges(spec).items():
        section = suite_registry.get(name.split("/", 1)[0]).engine
        out.setdefault(model, [])
        if section not in out[model]:
            out[model].append(section)
    return out


def section_engine(spec: Spec, section: str) -> EngineSpec:
    """The engine of `section` ("annotate", "generate"), else the top-level `engine`."""
    own: EngineSpec | None = getattr(getattr(spec, section), "engine", None)
    return own or spec.engine


def engine_for(spec: Spec, model: str) -> tuple[str, EngineSpec]:
    """The engine section serving a model, and its YAML path: the first section (judges: theirs;
    evaluated models: generate) that has an engine, else `engine`."""
    sections = list(judge_sections(spec).get(model, []))
    if model in {m.name for m in spec.models}:
        sections.append("generate")
    for section in sections:
        if (e := getattr(getattr(spec, section), "engine", None)) is not None:
            return f"{section}.engine", e
    return "engine", spec.engine
