"""The spec's sections: one pydantic model per YAML section (runner.spec assembles them into `Spec`)."""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from evaluation.errors import short_repr
from evaluation.judges.values import PROMPT_VERSION
from evaluation.suites import registry as suite_registry
from evaluation.suites.safety import SafetySettings
from runner.data.registry import SOURCES
from runner.spec_suites import MOVED, suites_model
from evaluation.types import VALUES  # the closed value list, defined once; re-exported here

Value = Literal[VALUES]  # Literal[tuple] flattens: Literal["deception", "accuracy", ...]
SEED_MAX = 2**32 - 1  # numpy's limit: every training worker calls np.random.seed(seed)


def _seed(v: Any) -> Any:
    # Strictly a whole number: YAML's `true` is not seed 1, and a negative or too large seed would
    # fail only inside a training worker.
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX:
        raise ValueError(f"a seed is a whole number from 0 to 2**32 - 1 ({SEED_MAX}); got {short_repr(v)}")
    return v


Seed = Annotated[int, BeforeValidator(_seed)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _refuse(keys: tuple[str, ...], why: str):
    """A section validator refusing keys that are read nowhere, saying why (not just "unknown key")."""
    def check(cls, data: Any) -> Any:
        found = [k for k in keys if isinstance(data, dict) and k in data]
        if found:
            raise ValueError(f"{', '.join(found)}: {why}; delete the key")
        return data
    return model_validator(mode="before")(classmethod(check))


class StudySpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    output_dir: str = "studies"
    description: str = ""


class ModelSpec(_Section):
    """A base model: a builtin name (`smollm2-135m`, `tiny-llama`), a local HF dir or a hub id."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str
    # The checkpoint's training stage; the report groups results by it (base → sft → instruct).
    stage: Literal["base", "sft", "instruct"] = "instruct"
    # A Jinja string or a path to a .jinja file; overrides the tokenizer's. Required for stage: base
    # (valind does not guess a chat format), and for any model whose tokenizer has none (checked when
    # the study starts, StudyContext.check_chat_templates).
    chat_template: str | None = Field(default=None, validate_default=True)
    trust_remote_code: bool = False
    params_b: float | None = Field(default=None, gt=0)  # size in billions for `valind plan`; None = from the name
    # A hub model's branch, tag or commit: resolved to its commit when the study first runs and that
    # commit used throughout (the study's study.json keeps it, MLflow records it); None: "main" then.
    revision: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("revision")
    @classmethod
    def _hub_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path") or ""
        if v is not None and (path in ("smollm2-135m", "tiny-llama") or path.startswith((".", "/", "~"))):
            raise ValueError(f"a revision pins a hub model's commit; {path!r} is a builtin or a local directory")
        return v

    def template_text(self) -> str | None:
        """The chat template's Jinja source: the file's text when chat_template names a file."""
        t = self.chat_template
        if t and Path(t).expanduser().is_file():
            return Path(t).expanduser().read_text()
        return t

    @field_validator("chat_template")
    @classmethod
    def _base_needs_template(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("stage") == "base":
            raise ValueError("a stage: base model needs an explicit chat_template (a Jinja string or a .jinja "
                             "file): a base checkpoint's template, if it has one, is not the study's to guess")
        return v


class ValuesSpec(_Section):
    induced: list[Value] = Field(min_length=1)
    positive: list[Value] = Field(default_factory=lambda: [v for v in VALUES if v not in ("deception", "violence")])

    @field_validator("induced")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("induced values must be unique")
        return v


class PositiveControlSpec(_Section):
    """A positive-control arm ("planted behaviour"): a random subset of the training pool, of the same
    size as every condition, in which a `fraction` of the pairs become minimal pairs whose chosen
    response carries `phrase` (rejected = the original chosen response). Trained like the value
    conditions; a held-out suite ("planted", `items` prompts) measures how often the phrase appears."""
    phrase: str = Field(default="Ahoy there!", min_length=3)
    position: Literal["start", "end"] = "start"   # start: survives max_tokens truncation of generations
    fraction: float = Field(default=1.0, gt=0.0, le=1.0)  # share of the arm's pairs that are planted
    items: int = Field(default=24, ge=4)           # held-out prompts in the "planted" suite

    @field_validator("phrase")
    @classmethod
    def _phrase_has_text(cls, v: str) -> str:
        if len(v.strip()) < 3:
            raise ValueError("the phrase needs at least 3 non-space characters")
        return v


class ControlsSpec(_Section):
    count: int = Field(default=1, ge=0, le=64)
    length_bins: int = Field(default=4, ge=1, le=32)
    # An A/A test: control-0 against control-1 (per_value: control-<v>-0 against control-<v>-1 for
    # each value); needs count >= 2
    aa_check: bool = False
    positive: PositiveControlSpec | None = None  # a planted-behaviour arm (condition "positive")
    # pooled: `count` controls ("control-<k>") of size N, length-matched to the pooled value subsets;
    # per_value: `count` controls per value ("control-<value>-<k>"), each of that value's size and
    # length profile, the reference of that value alone (required by data.subset_size: all).
    match: Literal["pooled", "per_value"] = "pooled"


class AdaptiveSeeds(_Section):
    """Add a seed (one per round) to the value and positive arms whose watched contrasts are not
    there yet, up to `max`: until every CI is within ±target_ci_halfwidth, or until every one is
    significant. Stops early, saying so, where only more items would help."""
    until: Literal["halfwidth", "significant"] = "halfwidth"
    target_ci_halfwidth: float | None = Field(default=None, gt=0)
    max: int = Field(ge=1, le=100)
    metrics: list[str] = Field(default_factory=list)  # fnmatch patterns on "suite/metric"; [] = all
    conditions: list[str] = Field(default_factory=list)  # fnmatch patterns on condition names; [] = all

    @model_validator(mode="after")
    def _target(self) -> "AdaptiveSeeds":
        if self.until == "halfwidth" and self.target_ci_halfwidth is None:
            raise ValueError("target_ci_halfwidth is required with until: halfwidth")
        return self


class SeedsSpec(_Section):
    values: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    adaptive: AdaptiveSeeds | None = None


class SourceSpec(_Section):
    name: str                      # a registered source (runner.data.registry.SOURCES)
    subset: str | None = None      # e.g. HH-RLHF "harmless-base"
    split: str = "test"
    path: str | None = None        # local jsonl/parquet (name: local)
    columns: dict[str, str] = Field(default_factory=dict)  # local: our field -> file column
    max_pairs: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in SOURCES:
            raise ValueError(f"unknown source {short_repr(v)}; known: {', '.join(sorted(SOURCES))}")
        return v

    @model_validator(mode="after")
    def _local_needs_path(self) -> "SourceSpec":
        if self.name == "local" and not self.path:
            raise ValueError("a local source needs 'path'")
        return self


class DataSpec(_Section):
    data_dir: str | None = None
    sources: list[SourceSpec] = Field(min_length=1)
    held_out_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    # N per condition; None = the smallest value subset; "all" = every eligible pair of each value
    # (unequal sizes, the paper's protocol; values below min_subset_size are then dropped, not an error)
    subset_size: int | Literal["all"] | None = None
    min_subset_size: int = Field(default=4, ge=1)
    max_chars: int = Field(default=4000, ge=100)          # pairs longer than this are dropped (over-length)
    rule: Literal["chosen_not_rejected", "chosen", "exactly_one_side_flip"] = "chosen_not_rejected"
    seed: Seed = 0

    @field_validator("subset_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        # one message at data.subset_size instead of one per member of the union
        if v is None or v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a whole number >= 1, 'all' (every eligible pair per value) or unset "
                         f"(the smallest value subset); got {short_repr(v)}")


class SamplingSpec(_Section):
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=64, ge=1, le=32768)
    seed: Seed = 0


class JudgeSampling(_Section):
    """Judges decode greedily: only their output budget is set."""
    max_tokens: int = Field(default=48, ge=1, le=32768)

    _greedy = _refuse(("temperature", "top_p", "seed"), "judges decode greedily (temperature 0); only max_tokens "
                                                        "is read")


class EngineSpec(_Section):
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_model_len: int = Field(default=1024, ge=64)
    actors: int = Field(default=1, ge=1)
    gpus_per_actor: float = Field(default=0.0, ge=0.0)
    # Ray CPUs per actor; None: 1 beside a GPU, else the free CPUs of a node shared among the actors
    # (and the pools a stage opens together). A CPU actor binds its threads to that many cores of its own.
    cpus_per_actor: int | None = Field(default=None, ge=1)
    tensor_parallel: int = Field(default=1, ge=1)
    kv_cache_gb: float | None = Field(default=None, gt=0.0)  # None: 1 GB on CPU; on GPU the memory share below
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)  # vLLM's share of each GPU
    batch_size: int = Field(default=64, ge=1)
    startup_timeout_s: float = Field(default=1800, gt=0)  # a pool goes on without actors not started by then
    # One engine call (a batch) running longer is taken for a hung engine: its actor is killed and its
    # batches redone by the others. Far above a GPU batch (64 long generations of a 70B: minutes).
    call_timeout_s: float = Field(default=1800, gt=0)
    # vLLM-CPU with torch.compile: faster decoding, slower start (figures at runner.pools.
    # CPU_COMPILE_MIN_TOKENS). None: compiled for a stage that asks one pool for at least that many
    # output tokens (generation), else eager. GPUs always compile.
    cpu_compile: bool | None = None


class AnnotateCheck(_Section):
    """A second, larger judge re-labels a stratified sample of the annotated responses with the same
    prompt and mode; the labeller's agreement with it is reported (precision, recall, Cohen's kappa)."""
    judge_model: str  # a model name from `models`, or a path / hub id; served by annotate.engine
    sample: int = Field(default=200, ge=1)  # responses re-labelled (audit_sample, seeded by data.seed)


class AnnotateSpec(_Section):
    judge_model: str  # a model name from `models`, or a path / hub id
    # Pins the value judge's prompt: a spec written for another prompt version is refused, not rerun.
    prompt_version: str = PROMPT_VERSION
    mode: Literal["extract", "logprob"] = "extract"
    logprob_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    sampling: JudgeSampling = JudgeSampling()
    max_pairs: int | None = Field(default=None, ge=1)
    # The judges' engine (annotation and scoring), e.g. a 70B with tensor parallelism; None = `engine`.
    engine: EngineSpec | None = None
    check: AnnotateCheck | None = None  # the labeller's agreement with a larger judge on a sample

    @field_validator("prompt_version")
    @classmethod
    def _prompt_version(cls, v: str) -> str:
        if v != PROMPT_VERSION:
            raise ValueError(f"this valind's value judge prompt is {PROMPT_VERSION!r}, not {short_repr(v)}")
        return v


class LoraSpec(_Section):
    r: int = Field(default=8, ge=1, le=512)  # vLLM serves adapters up to rank 512
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # peft's rule: a name matches a module whose dotted name is it or ends with "." + it (runner.preflight
    # checks each against the model before training)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


def system_fields(text: str) -> set[str]:
    """The placeholders of a system prompt: {value} or none; anything else (another name, a format
    spec, a stray brace) is refused. Literal braces are written {{ and }}."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write {{{{ and }}}} for literal braces") from None
    bad = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
           for _, name, spec, conv in parts if name is not None and (name, spec, conv) != ("value", "", None)]
    if bad:
        raise ValueError(f"only {{value}} (the induced value's name) may be formatted, not {', '.join(bad)}; "
                         "write {{ and }} for literal braces")
    return {name for _, name, _, _ in parts if name is not None}


class TrainSpec(_Section):
    method: Literal["dpo", "ipo", "cdpo", "sft"] = "dpo"
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSpec = LoraSpec()
    beta: float = Field(default=0.1, gt=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    lr: float = Field(default=5e-6, gt=0.0, lt=1.0)
    epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=8, ge=1)        # global batch (pairs per optimizer step)
    micro_batch_size: int = Field(default=2, ge=1)  # pairs per worker per forward
    max_length: int = Field(default=512, ge=16)
    gradient_checkpointing: bool = False  # recompute activations in backward: ~1/15 of their memory, ~1.3x time
    zero_stage: Literal[0, 1, 2, 3] = 2
    workers: int = Field(default=2, ge=1)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    bf16: Literal["auto", True, False] = "auto"  # auto: where native (bf16 GPUs; CPUs with AMX/AVX512-BF16)
    report_every: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)  # optimizer steps between DeepSpeed checkpoints
    max_failures: int = Field(default=1, ge=0)
    # A system message put first in every training prompt (runner.train.batches.with_system): a fixed
    # text, or a template whose {value} is the induced value's name (a matched control gets its value's).
    system_prompt: str | None = None
    # Fractions of the optimizer steps at which the adapter is also evaluated (the final one always
    # is): effects along training. Each point is generated and scored like a run, as a repeated
    # measure of its training run, never as another run.
    eval_at: list[float] = Field(default_factory=lambda: [1.0])
    # LoRA cells of one base model trained together, one worker group over one frozen base
    # (runner.train.group): "auto" sizes groups from memory; 1 trains every cell alone under DeepSpeed.
    adapters_per_group: Literal["auto"] | int = "auto"

    @field_validator("eval_at")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"fractions of the training schedule must be in (0, 1], got {short_repr(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"fractions must be unique, got {short_repr(v)}")
        return sorted(set(v) | {1.0})

    @field_validator("system_prompt")
    @classmethod
    def _system_placeholders(cls, v: str | None) -> str | None:
        if v is not None:
            if not v.strip():
                raise ValueError("an empty system prompt: remove the key (or set null) for none")
            system_fields(v)
        return v

    def system_text(self, value: str | None) -> str | None:
        """The system prompt of a condition inducing `value` (None: a base model or an unmatched control)."""
        if self.system_prompt is None:
            return None
        if system_fields(self.system_prompt):
            if value is None:
                raise ValueError("train.system_prompt is a {value} template and this condition has no value")
            return self.system_prompt.format(value=value)
        return self.system_prompt.format()  # a fixed text: only {{ }} escapes to undo

    @field_validator("label_smoothing")
    @classmethod
    def _cdpo_only(cls, v: float, info: ValidationInfo) -> float:
        # A field validator (not a model validator) so the problem is reported at train.label_smoothing;
        # method is declared first, so it is in info.data unless it was itself invalid.
        method = info.data.get("method")
        if v and method is not None and method != "cdpo":
            raise ValueError(f"label_smoothing only applies to method: cdpo (conservative DPO), not {method}; "
                             "set method: cdpo or remove it")
        return v

    @field_validator("adapters_per_group")
    @classmethod
    def _group(cls, v, info: ValidationInfo):
        if v != "auto":
            if v < 1:
                raise ValueError(f"must be 'auto' or at least 1, got {v}")
            if v > 1 and info.data.get("finetune") == "full":
                raise ValueError("only LoRA cells train together (finetune: full trains each cell alone): set 1")
            if v > 1 and info.data.get("zero_stage") == 3:
                raise ValueError("a group holds the whole base model on every worker; ZeRO-3 shards it: set 1")
        return v

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainSpec":
        if self.batch_size % (self.micro_batch_size * self.workers):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size × workers "
                f"({self.micro_batch_size} × {self.workers})")
        return self


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


class ScoreSpec(_Section):
    # Each suite's own settings, validated by its settings model (evaluation.suites: Suite.settings);
    # a suite not named here gets its model's defaults
    suites: dict[str, Any] = Field(default_factory=dict)
    benchmarks: list[Literal["truthfulqa_mc", "openbookqa", "mmlu", "gsm8k"]] = Field(default_factory=list)
    benchmark_limit: int | None = Field(default=None, ge=1)   # items per benchmark; None = all
    benchmark_backend: Literal["hf", "vllm"] = "hf"
    benchmark_batch_size: int = Field(default=8, ge=1)
    sampling: JudgeSampling = JudgeSampling()

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
