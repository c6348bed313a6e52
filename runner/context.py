"""What every stage gets: the spec, the store, cache keys, engine pools, the tracker, and the runs.

`StudyContext` is deliberately small: stages read the spec where they use it and pull their
inputs with `ctx.need(stage)`, so the data flows one way through `runner.stages`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluation.errors import ValindError
from runner import models as model_registry
from runner.spec import EngineSpec, Spec, SpecError, content_hash
from runner.store import Store


class StageError(ValindError):
    """A stage could not produce its unit; the unit is marked with _FAILED.json."""


@dataclass(frozen=True)
class Run:
    """One evaluated model: a base model, or a trained cell (model × condition × seed)."""
    run_id: str
    model: str
    condition: str
    kind: str               # base | value | control | positive (the planted-behaviour arm)
    value: str | None
    seed: int | None
    cell_key: str | None    # train-unit key; None for a base model
    match: str | None = None  # a per-value control's matched value (controls.match: per_value); else None
    stage: str = "instruct"  # the model's models[i].stage: base | sft | instruct (the report groups by it)
    progress: float = 1.0   # share of its cell's training schedule (train.eval_at); a base model: 0

    @property
    def final(self) -> bool:
        """The run's end point: a base model or a fully trained cell (not an eval_at checkpoint)."""
        return self.progress == 1.0 or self.kind == "base"


class StudyContext:
    def __init__(self, spec: Spec, spec_text: str, root: Path, *, runs: Callable[[], list[Run]],
                 runs_table: Callable[[], Any], need: Callable[[str], Any], seeds):
        from runner.pools import Pools

        self.spec, self.spec_text, self.root = spec, spec_text, root
        self.store = Store(root)
        self.data_dir = spec.data_dir()
        self.runs, self.runs_table, self.need = runs, runs_table, need
        self.seeds = seeds  # runner.seeds.SeedBook
        self.pools = Pools(self)
        self._keys: dict[tuple[str, str | None], str] = {}
        self._model_ids: dict[str, str] = {}
        self._tokenizers: dict[str, Any] = {}
        self._data_marker: str | None = None
        self._tracker = None

    # ---------------------------------------------------------------- keys
    def key(self, declared, run: Run | None = None) -> str:
        """A declared key (runner.stages.keys.Key), computed once per process."""
        k = (declared.stage, run.run_id if run else None)
        if k not in self._keys:
            self._keys[k] = declared.compute(self, run)
        return self._keys[k]

    def forget_keys(self) -> None:
        """After the run list changed (an adaptive seed): keys that cover every run are stale."""
        self._keys.clear()

    def data_marker(self) -> str:
        """The data directory as an input: its files' names, sizes and times."""
        if self._data_marker is None:
            d = self.data_dir
            self._data_marker = "" if not d or not d.exists() else content_hash(sorted(
                (str(p.relative_to(d)), p.stat().st_size, int(p.stat().st_mtime)) for p in d.rglob("*") if p.is_file()))
        return self._data_marker

    # -------------------------------------------------------------- models
    def model_path(self, name_or_path: str) -> str:
        return model_registry.resolve(self.spec.model(name_or_path).path)

    def model_id(self, name_or_path: str) -> str:
        if name_or_path not in self._model_ids:
            m = self.spec.model(name_or_path)
            self._model_ids[name_or_path] = content_hash(model_registry.identity(m.path), m.chat_template)
        return self._model_ids[name_or_path]

    def chat_template(self, name: str) -> str | None:
        return self.spec.model(name).template_text()

    def tokenizer(self, name: str):
        """A model's tokenizer, loaded once; a model with no chat template (the tokenizer's or the
        spec's) is refused here, where the tokenizer is first seen."""
        if name not in self._tokenizers:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(self.model_path(name),
                                                trust_remote_code=self.spec.model(name).trust_remote_code)
            if tok.chat_template is None and self.chat_template(name) is None:
                raise SpecError("spec", [self._template_field(name)])
            self._tokenizers[name] = tok
        return self._tokenizers[name]

    def _template_field(self, name: str) -> tuple[str, str]:
        """The spec field to fix for a model with no chat template, and what to do (a SpecError problem)."""
        s = self.spec
        for i, m in enumerate(s.models):
            if m.name == name:
                return f"models[{i}].chat_template", (
                    f"the tokenizer of {m.path!r} has no chat template and valind does not guess one: give the "
                    "model's chat format here (a Jinja string or a .jinja file)")
        judges = {"annotate.judge_model": s.annotate.judge_model,
                  "annotate.check.judge_model": s.annotate.check and s.annotate.check.judge_model,
                  "score.value_judge": s.score.value_judge,
                  "score.refusal_llm_judge": s.score.refusal_llm_judge, "score.anthro_judge": s.score.anthro_judge}
        return next(f for f, v in judges.items() if v == name), (
            f"the judge {name!r} has no chat template and valind does not guess one: choose an instruct model")

    def check_chat_templates(self) -> None:
        """Every model the study prompts (evaluated models and judges) has a chat template: checked
        before any compute, so a base checkpoint fails in seconds rather than after annotation."""
        for name in dict.fromkeys([m.name for m in self.spec.models] + sorted(self.judge_models())):
            self.tokenizer(name)

    def judge_models(self) -> set[str]:
        return self.spec.judge_models()

    def engine_spec(self, model: str) -> EngineSpec:
        """The engine section serving a model (Spec.engine_for)."""
        return self.spec.engine_for(model)[1]

    def engine_identity(self, model: str) -> dict:
        """What of a model's engine changes its outputs (a key input): the model and its numerics."""
        e = self.engine_spec(model)
        return {"model": self.model_id(model), "dtype": e.dtype, "max_model_len": e.max_model_len,
                "backend": e.backend}

    # ------------------------------------------------------------- tracking
    @property
    def tracker(self):
        if self._tracker is None:
            from runner.tracking import Tracker, tracking_uri
            t = self.spec.tracking
            self._tracker = Tracker(tracking_uri(t.uri, self.root), t.experiment or self.spec.study.name,
                                    self.spec.study.name, self.root, t.artifact_location)
        return self._tracker

    def ensure_ray(self):
        from runner.cluster import init_ray
        return init_ray()

    # --------------------------------------------------------------- units
    @contextmanager
    def failing(self, stage: str, keys: str | list[str], label: str):
        """Produce units: an error marks each one not yet done failed (`valind status` shows it)
        and propagates."""
        try:
            yield
        except Exception as e:
            for k in [keys] if isinstance(keys, str) else keys:
                if not self.store.done(stage, k):
                    self.store.mark_failed(stage, k, f"{label}: {type(e).__name__}: {e}")
            raise
