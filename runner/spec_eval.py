"""The spec's evaluation-side sections: generation, scoring, analysis, tracking and planning
(runner.spec assembles them into `Spec`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from evaluation.errors import short_repr
from evaluation.suites import registry as suite_registry
from evaluation.suites.safety import SafetySettings
from runner.spec_sections import EngineSpec, JudgeSampling, SamplingSpec, _Section, _refuse
from runner.spec_suites import MOVED, suites_model

class GenerateSpec(_Section):
    # Registered suites (evaluation.suites, plugins' included); default: every built-in suite a spec may
    # list (an installed plugin's suite runs where a spec lists it: installing one changes no study)
    suites: list[str] = Field(default_factory=lambda: suite_registry.listable(plugins=False), min_length=1)
    items_per_suite: int | None = Field(default=None, ge=1)  # cap per suite; None = all items
    sampling: SamplingSpec = SamplingSpec(max_tokens=128)
    engine: EngineSpec | None = None  # the evaluated models' engines; None = `engine`
    # The system prompt at generation: none, or "train": each trained run's own training system
    # prompt; base models get it only when train.system_prompt is a fixed text (a {value} template
    # has no value for them). See generation_system_prompt.
    system_prompt: Literal["none", "train"] = "none"
    # Runs of a base model generated together through its pool: each run is saved as its chunk is
    # answered (a stopped driver loses at most a chunk); larger chunks fill the engines' batches better
    runs_per_chunk: int = Field(default=8, ge=1)

    @field_validator("suites")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in suite_registry.listable()]
        if bad:
            raise ValueError(f"unknown suite(s) {short_repr(bad)}; known: {', '.join(suite_registry.listable())}"
                             + (" ('planted' is added by controls.positive)" if "planted" in bad else ""))
        if len(set(v)) != len(v):
            raise ValueError("suites must be unique")
        return v


class ScoreCheck(_Section):
    """A second judge re-scores a random sample of the trained runs' generations with each suite's LLM
    judges' prompts; each judge's agreement with it is reported (runner.stages.score_check)."""
    judge_model: str  # a model name from `models`, or a path / hub id; served by annotate.engine
    sample: int = Field(default=100, ge=1)  # responses re-scored per suite (uniform, seeded by `seed`)
    seed: int = 0


class ScoreSpec(_Section):
    # Each suite's own settings, validated by its settings model (evaluation.suites: Suite.settings);
    # a suite not named here gets its model's defaults
    suites: dict[str, Any] = Field(default_factory=dict)
    benchmarks: list[Literal["truthfulqa_mc", "openbookqa", "mmlu", "gsm8k"]] = Field(default_factory=list)
    benchmark_limit: int | None = Field(default=None, ge=1)   # items per benchmark; None = all
    benchmark_backend: Literal["hf", "vllm"] = "hf"
    benchmark_batch_size: int = Field(default=8, ge=1)
    sampling: JudgeSampling = JudgeSampling()
    check: ScoreCheck | None = None  # the LLM judges' agreement with a second judge on trained runs' responses

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        found = [k for k in MOVED if isinstance(data, dict) and k in data]
        if found:
            raise ValueError("; ".join(f"{k} is now {MOVED[k]}" for k in found) + " (each suite owns its settings)")
        return data

    @field_validator("suites", mode="before")
    @classmethod
    def _suite_settings(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # dict[str, Any] reports it
        given = suites_model().model_validate(v)
        return {n: getattr(given, n) for n in v}

    def suite(self, name: str) -> BaseModel:
        """Suite `name`'s settings (its model's defaults when score.suites does not name it)."""
        got = self.suites.get(name)
        return got if got is not None else suite_registry.get(name).settings()

    @property
    def safety(self) -> SafetySettings:
        """score.suites.safety: the refusal judges, which the agreement stage and the default primary
        judge read too."""
        got = self.suite("safety")
        assert isinstance(got, SafetySettings)
        return got


class AnalyzeSpec(_Section):
    """Inference is analytic (docs/STATISTICS.md): there is no bootstrap or permutation count to set."""
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    power: float = Field(default=0.8, gt=0.0, lt=1.0)
    # The smallest effect of interest, on the metrics' own scale: power and seeds-for-power are
    # planned against it (never against the observed effect). None = no power planning.
    min_effect: float | None = Field(default=None, gt=0.0)
    # The judge whose verdict counts, per "suite/metric" pattern or suite; other judges of the same
    # metric are sensitivity analyses. Metrics with one judge need no entry; safety defaults to the
    # first of score.suites.safety.judges.
    primary_judges: dict[str, str] = Field(default_factory=dict)
    # "Stays stable" claims: equivalence margin per "suite/metric" pattern or suite, on the metric's own
    # scale; each contrast gets two one-sided tests against ±margin (evaluation/equivalence.py, where
    # the default ±0.05 for QA accuracy is justified). Metrics without a margin are not tested for it.
    equivalence_margin: dict[str, float] = Field(default_factory=lambda: {"qa/acc": 0.05})

    @field_validator("equivalence_margin")
    @classmethod
    def _positive_margins(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if not m > 0}
        if bad:
            raise ValueError(f"each margin must be > 0 (an equivalence band ±margin); got {bad}")
        return v

    _removed = _refuse(("bootstrap", "permutations", "seed"), "removed in valind 0.2, inference is analytic "
                                                             "(crossed runs × items t-test, docs/STATISTICS.md)")
    _replaced = _refuse(("min_changed_share",), "replaced by the adapter probe (evaluation/sanity.py): a trained "
                        "run is flagged when its per-token log-probs differ from its base model's by no more than a "
                        "threshold derived from a zero adapter's; an unchanged model's greedy responses differ from "
                        "the base run's on 38-55% of the items on a CPU, so no share of changed responses could "
                        "flag anything")


class TrackingSpec(_Section):
    uri: str | None = None         # default: $MLFLOW_TRACKING_URI, else sqlite under the study dir
    experiment: str | None = None  # default: the study name
    artifact_location: str | None = None  # s3://, gs://, file:// or an absolute path; used when creating the experiment

    @field_validator("artifact_location")
    @classmethod
    def _artifact_scheme(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith(("s3://", "gs://", "file://")) or v.startswith("/")):
            raise ValueError("must be an s3://, gs:// or file:// URI or an absolute path")
        return v


class PlanSpec(_Section):
    """Throughput overrides for `valind plan`, per GPU; None = runner.plan's default for the model size."""
    judge_responses_per_s: float | None = Field(default=None, gt=0)   # judge responses (annotate, score)
    train_pairs_per_s: float | None = Field(default=None, gt=0)       # preference pairs per optimizer pass
    generate_tokens_per_s: float | None = Field(default=None, gt=0)   # output tokens of the evaluated models
    efficiency: float = Field(default=0.8, gt=0, le=1)                # share of the GPUs' time doing work


class ClusterSpec(_Section):
    """The cluster `valind plan` sizes wall time for (default: cluster.yaml's GPU node type)."""
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=1)
    gpu_memory_gb: float = Field(default=80, gt=0)  # per GPU: `valind plan` refuses training that cannot fit
    # Logical CPUs per node (Ray's CPU resource); None: CPU demands are not checked against the cluster
    cpus_per_node: int | None = Field(default=None, ge=1)
