"""The spec's training-side sections: annotation, LoRA and training (runner.spec assembles them into `Spec`)."""
from __future__ import annotations

import string
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from evaluation.errors import short_repr
from evaluation.judges.values import PROMPT_VERSION
from runner.spec_sections import EngineSpec, JudgeSampling, _Section

class AnnotateCheck(_Section):
    """A second, larger judge re-labels a random sample of the annotated responses with the same
    prompt and mode; the labeller's agreement with it is reported (precision, recall, Cohen's kappa:
    population estimates, since the sample is uniform over the scored responses)."""
    judge_model: str  # a model name from `models`, or a path / hub id; served by annotate.engine
    sample: int = Field(default=200, ge=1)  # responses re-labelled (uniform random_sample, seeded by data.seed)


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


# The positive arm's system prompt under a {value} template (its pairs are no value's): fixed and
# neutral, so the arm measures what training alone plants. Stated in the report's curation section.
POSITIVE_SYSTEM_PROMPT = "You are a helpful assistant."


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
    # Seconds between checkpoints besides (each eval_at point is one too): a failure loses at most
    # this much work. "auto": 15 min on GPU workers; off on CPU workers, whose cells (demo, tests)
    # last minutes, where checkpoint_every covers them and a clock would make resume points vary run
    # to run. null: off.
    checkpoint_every_s: Literal["auto"] | float | None = "auto"
    max_failures: int = Field(default=1, ge=0)
    # A system message put first in every training prompt (runner.train.batches.with_system): a fixed
    # text, or a template whose {value} is the induced value's name (a matched control gets its value's).
    system_prompt: str | None = None
    # Fractions of the optimizer steps at which the adapter is also evaluated (the final one always
    # is): effects along training. Each point is generated and scored like a run, as a repeated
    # measure of its training run, never as another run.
    eval_at: list[float] = Field(default_factory=lambda: [1.0])
    # Doses. per_subset: each condition trains `epochs` passes over its subset (floor(size / batch_size)
    # steps each), so a larger subset gets more optimizer steps. equal: every condition of the study
    # trains the largest condition's number of steps (its epochs × steps per epoch); a smaller subset
    # repeats, reshuffled each epoch, its last epoch possibly partial (the report gives each one's epochs).
    steps_per_condition: Literal["per_subset", "equal"] = "per_subset"
    # Optimizer steps (not fractions) at which the adapter is also evaluated, the same steps for every
    # condition: instead of eval_at. Each must lie below every condition's schedule (an error otherwise).
    eval_at_steps: list[int] = Field(default_factory=list)
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

    @field_validator("eval_at_steps")
    @classmethod
    def _steps(cls, v: list[int], info: ValidationInfo) -> list[int]:
        if any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"optimizer steps must be unique and at least 1, got {short_repr(v)}")
        if v and info.data.get("eval_at", [1.0]) != [1.0]:
            raise ValueError("train.eval_at_steps and train.eval_at (fractions) are two ways to place the points "
                             "along training: set one of them")
        return sorted(v)

    @field_validator("system_prompt")
    @classmethod
    def _system_placeholders(cls, v: str | None) -> str | None:
        if v is not None:
            if not v.strip():
                raise ValueError("an empty system prompt: remove the key (or set null) for none")
            system_fields(v)
        return v

    def system_text(self, value: str | None, positive: bool = False) -> str | None:
        """The system prompt of a condition inducing `value` (None: a base model or an unmatched control);
        `positive`: the positive arm, which a {value} template gives POSITIVE_SYSTEM_PROMPT."""
        if self.system_prompt is None:
            return None
        if system_fields(self.system_prompt):
            if positive:
                return POSITIVE_SYSTEM_PROMPT
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

    @field_validator("checkpoint_every_s")
    @classmethod
    def _positive_seconds(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"must be a positive number of seconds, 'auto' or null, got {v}")
        return v

    def checkpoint_seconds(self) -> float | None:
        """checkpoint_every_s resolved: "auto" is 900 s on GPU workers and off (None) on CPU workers."""
        if self.checkpoint_every_s == "auto":
            return 900.0 if self.gpus_per_worker > 0 else None
        return None if self.checkpoint_every_s is None else float(self.checkpoint_every_s)

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainSpec":
        if self.batch_size % (self.micro_batch_size * self.workers):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size × workers "
                f"({self.micro_batch_size} × {self.workers})")
        return self
