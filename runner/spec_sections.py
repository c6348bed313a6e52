"""The spec's sections: one pydantic model per YAML section (runner.spec assembles them into `Spec`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from evaluation.errors import short_repr
from runner.data.registry import SOURCES
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


TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")


def is_template_path(text: str) -> bool:
    """A chat_template that names a file rather than holding Jinja: one line, no Jinja markers, and a
    template suffix or a "/" (plain words are template text, which the render check then refuses)."""
    one_line = "\n" not in text.strip() and not any(m in text for m in ("{{", "{%", "{#"))
    return one_line and (text.strip().endswith(TEMPLATE_SUFFIXES) or "/" in text)


def resolve_spec_path(text: str, info: ValidationInfo) -> str:
    """An existing file's absolute path; a relative path is read from the spec file's folder (the
    validation context's ``spec_dir``; the working directory for a spec given as data)."""
    spec_dir = (info.context or {}).get("spec_dir")
    path = Path(text.strip()).expanduser()
    base = Path(spec_dir) if spec_dir is not None else Path.cwd()
    full = path if path.is_absolute() else base / path
    if not full.is_file():
        where = f"the spec file's folder {base}" if spec_dir is not None else f"the working directory {base}"
        raise ValueError(f"no such file: {short_repr(text)} (a relative path is read from {where})")
    return str(full.resolve())


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
    # The model's family (e.g. "llama-3"): the analysis also pools each contrast across the models of
    # a family having ≥ 2 of them (evaluation/pooled.py), beside the pool over every model. None: none.
    family: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

    @field_validator("revision")
    @classmethod
    def _hub_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path") or ""
        if v is not None and (path in ("smollm2-135m", "tiny-llama") or path.startswith((".", "/", "~"))):
            raise ValueError(f"a revision pins a hub model's commit; {path!r} is a builtin or a local directory")
        return v

    def template_text(self) -> str | None:
        """The chat template's Jinja source: the file's text when chat_template names a file (validation
        made the path absolute and checked it exists; a file deleted since is an error, never the path's text)."""
        t = self.chat_template
        if t is not None and is_template_path(t):
            return Path(t).read_text()
        return t

    @field_validator("chat_template")
    @classmethod
    def _base_needs_template(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("stage") == "base":
            raise ValueError("a stage: base model needs an explicit chat_template (a Jinja string or a .jinja "
                             "file): a base checkpoint's template, if it has one, is not the study's to guess")
        if v is not None and is_template_path(v):
            return resolve_spec_path(v, info)
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
    size as every condition (data.subset_size: all: the median kept value size), in which a `fraction`
    of the pairs become minimal pairs whose chosen response carries `phrase` (rejected = the original
    chosen response). Trained like the value conditions (a {value} system-prompt template: with
    POSITIVE_SYSTEM_PROMPT); a held-out suite ("planted", `items` prompts) measures how often the phrase
    appears."""
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
    # per_value: `count` controls per value ("control-<value>-<k>"), the reference of that value alone
    # (required by data.subset_size: all), each carrying what the value's subset carries: its size,
    # its pairs per source length-matched within the source, and its flipped pairs per source
    # (runner.data.draws.draw_matched).
    match: Literal["pooled", "per_value"] = "pooled"
    # A prompt-only arm: each base model generates with each induced value's training system prompt
    # (train.system_prompt, required) and no training: runs "<model>__prompt-<value>", one per
    # (model, value) (generation is seeded, there is no training seed), compared with the value's runs.
    prompt_only: bool = False


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
    # (unequal sizes, the protocol preset's choice; values below min_subset_size are then dropped, not an error)
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
    kv_cache_gb: float | None = Field(default=None, gt=0.0)  # vLLM-CPU's KV cache; None: 1 GB. GPUs ignore it
    # A cap on a GPU engine's KV cache; None: the cache takes what gpu_memory_utilization leaves
    gpu_kv_cache_gb: float | None = Field(default=None, gt=0.0)
    # Generation on engines that take requests one by one (vLLM): "continuous" streams them so
    # finished sequences' places are refilled; "batches": batch_size-request calls, each run to its
    # longest answer (before issue 34). The transformers backend always runs batches.
    feeding: Literal["continuous", "batches"] = "continuous"
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
