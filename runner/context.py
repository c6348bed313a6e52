"""What every stage gets: the spec, the store, cache keys, engine pools, the tracker, and the runs.

`StudyContext` is deliberately small: stages read the spec where they use it and pull their
inputs with `ctx.need(<an earlier stage's result type>)`, so the data flows one way through
`runner.stages`. Nothing here imports a stage: the stages import this.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from evaluation.errors import ValindError
from runner import models as model_registry
from runner.capacity import Demand
from runner.cluster import init_ray
from runner.data.registry import DataError
from runner.data.sources import local_path
from runner.fingerprint import dir_fingerprint, file_fingerprint
from runner.pools import Pools
from runner.spec import Spec, SpecError, content_hash, parse_condition
from runner.spec_sections import EngineSpec
from runner.spec_views import judge_fields
from runner.store import Store
from runner.tracking import Tracker, tracking_uri
from runner.train.doses import epochs_of, step_fractions

if TYPE_CHECKING:
    from runner.seeds import SeedBook
    from runner.stages.keys import Key
    from runner.stages.unit import StageResult

R = TypeVar("R", bound="StageResult")


class StageError(ValindError):
    """A stage could not produce its unit; the unit is marked with _FAILED.json."""


@dataclass(frozen=True)
class Run:
    """One evaluated model: a base model, or a trained cell (model × condition × seed)."""
    run_id: str
    model: str
    condition: str
    kind: str               # base | value | control | positive (the planted-behaviour arm) | prompt (untrained)
    value: str | None
    seed: int | None
    cell_key: str | None    # train-unit key; None for a base model or a prompt-only run
    match: str | None = None  # a per-value control's matched value (controls.match: per_value); else None
    stage: str = "instruct"  # the model's models[i].stage: base | sft | instruct (the report groups by it)
    progress: float = 1.0   # share of its cell's training schedule (train.eval_at); a base model: 0; NaN: not known yet
    # The optimizer step of its adapter and the passes over its subset up to it, where the runs
    # are listed with the subsets' sizes (train.eval_at_steps or steps_per_condition: equal); else None
    step: int | None = None
    epochs: float | None = None
    family: str | None = None  # models[i].family: the analysis pools contrasts within each family too

    @property
    def final(self) -> bool:
        """The run's end point: a base model or a fully trained cell (not an eval_at checkpoint)."""
        return self.progress == 1.0 or self.kind == "base"


# A condition's (optimizer steps, subset size) when known (runner.train.doses), for Run.step/epochs
Doses = Callable[[str], tuple[int, int]]


def study_runs(spec: Spec, conditions: list[str], seeds_of: Callable[[str], list[int]],
               cell_key: Callable[[Run], str | None] = lambda r: None, doses: Doses | None = None,
               values: list[str] | None = None) -> list[Run]:
    """Every run a study evaluates: each model's base, its prompt-only runs (controls.prompt_only: one
    per induced value in `values`, untrained, so no seed), each cell (model × condition × seed) and the
    same cell's adapter part-way through training (train.eval_at, or train.eval_at_steps, which needs
    `doses`). `Study.runs` (with the cells' keys and doses) and `valind plan` (without) both list runs
    here, so the plan counts what the pipeline evaluates."""
    out: list[Run] = []
    t = spec.train
    for m in spec.models:
        out.append(Run(f"{m.name}__base", m.name, "base", "base", None, None, None, stage=m.stage, progress=0.0,
                       family=m.family))
        if spec.controls.prompt_only:
            out += [Run(f"{m.name}__prompt-{v}", m.name, f"prompt-{v}", "prompt", v, None, None, stage=m.stage,
                        family=m.family) for v in (values if values is not None else spec.values.induced)]
        for cond in conditions:
            kind, value, match = parse_condition(cond)
            steps, size = doses(cond) if doses else (0, 0)
            # eval_at_steps without the subsets' sizes (before curation, `valind plan`): listed, their share unknown
            points = step_fractions(t, steps, cond) if doses or not t.eval_at_steps else \
                [math.nan] * len(t.eval_at_steps) + [1.0]

            def at(f: float) -> dict[str, Any]:
                if not doses:
                    return {}
                k = min(steps, max(1, round(f * steps)))  # runner.train.loop.progress_steps
                return {"step": k, "epochs": epochs_of(k, size, t.batch_size)}
            for seed in seeds_of(cond):
                r = Run(f"{m.name}__{cond}__s{seed}", m.name, cond, kind, value, seed, None, stage=m.stage,
                        match=match, family=m.family, **at(1.0))
                r = replace(r, cell_key=cell_key(r))
                out.append(r)
                # the same cell's adapter part-way through training: one run's repeated measures
                out += [replace(r, run_id=_point_id(r.run_id, t.eval_at_steps, i, f), progress=f, **at(f))
                        for i, f in enumerate(points) if not f >= 1]
    return out


def _point_id(run_id: str, eval_at_steps: list[int], i: int, f: float) -> str:
    """A point's run id: "__p<fraction>" (train.eval_at) or "__step<k>" (train.eval_at_steps)."""
    return f"{run_id}__step{eval_at_steps[i]}" if eval_at_steps else f"{run_id}__p{f:g}"


class StudyContext:
    def __init__(self, spec: Spec, spec_text: str, root: Path, *, runs: Callable[[], list[Run]],
                 runs_table: Callable[[], Any], need: Callable[[str], object], seeds: SeedBook):
        self.spec: Spec = spec
        self.spec_text, self.root = spec_text, root
        self.store = Store(root)
        self.data_dir: Path | None = spec.data_dir()
        self.runs, self.runs_table, self._need = runs, runs_table, need
        self.seeds = seeds
        self.pools = Pools(self)
        self.demand = Demand()  # what the running stages ask the autoscaler for
        self._keys: dict[tuple[str, str | None], str] = {}
        self._model_ids: dict[str, str] = {}
        self._tokenizers: dict[str, Any] = {}
        self._data_marker: str | None = None
        self.revisions: dict[str, str] = {}  # hub models' commits (model name -> sha), see model_revision
        self._tracker: Tracker | None = None

    # -------------------------------------------------------------- stages
    @overload
    def need(self, stage: type[R]) -> R: ...
    @overload
    def need(self, stage: str) -> object: ...

    def need(self, stage: type[R] | str) -> R | object:
        """An earlier stage's result, produced once per process: `ctx.need(Annotated)` is typed by
        the result's class (runner.stages.unit.StageResult); by name, it is unchecked."""
        if isinstance(stage, str):
            return self._need(stage)
        got = self._need(stage.stage)
        if not isinstance(got, stage):
            raise TypeError(f"the {stage.stage} stage returned {type(got).__name__}, not {stage.__name__}")
        return got

    # ---------------------------------------------------------------- keys
    def key(self, declared: Key, run: Run | None = None) -> str:
        """A declared key (runner.stages.keys.Key), computed once per process."""
        k = (declared.stage, run.run_id if run else None)
        if k not in self._keys:
            self._keys[k] = declared.compute(self, run)
        return self._keys[k]

    def forget_keys(self) -> None:
        """After the run list changed (an adaptive seed): keys that cover every run are stale."""
        self._keys.clear()

    def data_marker(self) -> str:
        """The data directory as an input: its files' names and contents."""
        if self._data_marker is None:
            d = self.data_dir
            self._data_marker = dir_fingerprint(d, full=True) if d and d.is_dir() else ""
        return self._data_marker

    def local_sources(self) -> dict[str, str]:
        """The content of each local preference file (data.sources[i].path) as an input."""
        out = {}
        for i, src in enumerate(self.spec.data.sources):
            if src.path:
                try:
                    out[f"{i}:{src.path}"] = file_fingerprint(local_path(src, self.data_dir), full=True)
                except DataError:  # moved away: the key differs; validate and run refuse it (runner.preflight)
                    out[f"{i}:{src.path}"] = "missing"
        return out

    # -------------------------------------------------------------- models
    def model_path(self, name_or_path: str) -> str:
        """A local directory of the model: a builtin's, a local one, or a hub model's snapshot at its
        commit (downloaded by the driver on first need, so every worker loads the same files)."""
        m = self.spec.model(name_or_path)
        commit = self.model_revision(name_or_path)  # None: not a hub model
        if commit is not None:
            return model_registry.hub_snapshot(m.path, commit)
        return model_registry.resolve(m.path)

    def model_revision(self, name_or_path: str) -> str | None:
        """A hub model's commit (models[i].revision resolved once, or as recorded by the study's first
        run: `revisions`); None for builtins and local directories."""
        m = self.spec.model(name_or_path)
        if not model_registry.is_hub_id(m.path):
            return None
        if m.name not in self.revisions:
            self.revisions[m.name] = model_registry.hub_commit(m.path, m.revision)
        return self.revisions[m.name]

    def model_id(self, name_or_path: str) -> str:
        """A model as a key input: its weights' content (or hub commit), chat template and remote code."""
        if name_or_path not in self._model_ids:
            m = self.spec.model(name_or_path)
            self._model_ids[name_or_path] = content_hash(
                model_registry.identity(m.path, self.model_revision(name_or_path)), self.chat_template(name_or_path),
                m.trust_remote_code)
        return self._model_ids[name_or_path]

    def chat_template(self, name: str) -> str | None:
        return self.spec.model(name).template_text()

    def tokenizer(self, name: str) -> Any:
        """A model's tokenizer, loaded once; a model with no chat template (the tokenizer's or the
        spec's) is refused here, where the tokenizer is first seen."""
        if name not in self._tokenizers:
            from transformers import AutoTokenizer  # deferred: transformers takes seconds to import
            m = self.spec.model(name)
            hub = model_registry.is_hub_id(m.path)  # its tokenizer files only, not the weights
            tok = AutoTokenizer.from_pretrained(m.path if hub else self.model_path(name),
                                                revision=self.model_revision(name) if hub else None,
                                                trust_remote_code=m.trust_remote_code)
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
        return next(f for f, v in judge_fields(s).items() if v == name), (
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

    def engine_identity(self, model: str) -> dict[str, Any]:
        """What of a model's engine changes its outputs (a key input): the model and its numerics."""
        e = self.engine_spec(model)
        return {"model": self.model_id(model), "dtype": e.dtype, "max_model_len": e.max_model_len,
                "backend": e.backend}

    # ------------------------------------------------------------- tracking
    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            t = self.spec.tracking
            self._tracker = Tracker(tracking_uri(t.uri, self.root), t.experiment or self.spec.study.name,
                                    self.spec.study.name, self.root, t.artifact_location)
        return self._tracker

    def ensure_ray(self) -> Any:
        """Ray, started or joined (runner.cluster.init_ray), and asked for the running stages' needs."""
        ray = init_ray()
        self.demand.ask()  # the running stages' request, now that there is a cluster to ask
        return ray
