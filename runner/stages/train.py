"""train: every (model × condition × seed) cell, as Ray Tune trials of Ray Train + DeepSpeed.

The driver resolves the train section once (bf16 "auto" included) into one frozen `Cell` per
cell; the trial and its workers read only that."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from runner.capacity import max_concurrent
from runner.context import Run, StageError, StudyContext
from runner.plan import params_b
from runner.progress import say
from runner.spec import content_hash, training_system_prompt
from runner.spec_train import TrainSpec
from runner.stages.curate import CURATE, Curated
from runner.stages.keys import Key
from runner.stages.unit import StageResult, Unit
from runner.store import read_json, read_state, safe_name
from runner.tracking import flatten, log_run
from runner.train.cell import Cell, Group
from runner.train.doses import step_fractions
from runner.train.memory import group_layout, model_shape, worker_budget_gb


@dataclass(frozen=True)
class Trained(StageResult):
    """The train stage's result: each trained run's model (run id -> adapter or model directory)."""
    stage: ClassVar[str] = "train"
    models: dict[str, Path]


# train fields that cannot change what a cell learns (runner.stages.keys.OUTSIDE_KEYS says why)
NOT_LEARNED = {"adapters_per_group", "max_failures", "checkpoint_every", "checkpoint_every_s", "report_every"}


def _train_section(ctx: StudyContext, run: Any) -> dict[str, Any]:
    """The train section as a cell sees it; `system_prompt`, `eval_at`, `eval_at_steps` and
    `steps_per_condition` enter only when set (cells trained before they existed keep their keys).
    With a {value} template the condition, also hashed, fixes the text; under steps_per_condition:
    equal the steps follow from every subset's size, which the curate key (also hashed) fixes."""
    t = ctx.spec.train
    unset = {k for k, v in (("system_prompt", t.system_prompt is None), ("eval_at", t.eval_at == [1.0]),
                            ("eval_at_steps", not t.eval_at_steps),
                            ("steps_per_condition", t.steps_per_condition == "per_subset")) if v}
    dumped: dict[str, Any] = t.model_dump(mode="json", exclude=unset | NOT_LEARNED)
    return dumped


TRAIN = Key("train", {
    "curate": lambda c, r: CURATE(c),
    "model": lambda c, r: c.model_id(r.model),
    # two spec models with the same weights are still two models: each trains its own cells
    "model name": lambda c, r: r.model,
    "condition": lambda c, r: r.condition,
    "seed": lambda c, r: r.seed,
    "train": _train_section,
    "loss version": lambda c, r: _loss_version(c.spec.train.method),
}, per_run=True)


def _loss_version(method: str) -> str:
    from runner.train.losses import VERSIONS  # deferred: torch, imported only when keys are computed
    version: str = VERSIONS[method]
    return version


def cell_unit(ctx: StudyContext, r: Run) -> Unit:
    """A trained run's cell's unit (the TRAIN key of its final run: `Run.cell_key`)."""
    assert r.cell_key is not None, f"{r.run_id} is not a trained run"
    return Unit(ctx.store, TRAIN.stage, r.cell_key)


def run(ctx: StudyContext) -> Trained:
    t = ctx.spec.train
    if t.eval_at_steps or t.steps_per_condition == "equal":
        ctx.need(Curated)  # the runs carry each cell's steps once curation is done (Study.doses)
    trained = [r for r in ctx.runs() if r.cell_key]
    cells = [r for r in trained if r.final]
    for r in cells:  # published by a driver that was killed before it could mark the cell done
        adopt(ctx, r)
    todo = [r for r in cells if not cell_unit(ctx, r).cached()]
    say(f"train: {len(cells)} cells, {len(cells) - len(todo)} cached")
    if todo:
        _train(ctx, todo)
    log_training(ctx, cells)
    say(f"train: done — {len(cells)} cells")
    return Trained({r.run_id: adapter_path(ctx, r) for r in trained})


def adapter_path(ctx: StudyContext, r: Run) -> Path:
    """A trained run's model: its cell's final one, or the one saved at r.progress (train.eval_at)."""
    unit = cell_unit(ctx, r)
    return unit / "model" if r.final else unit.dir / "progress" / f"{r.progress:g}"


def _train(ctx: StudyContext, todo: list[Run]) -> None:
    # deferred: Ray and torch (the trainer), imported only when a cell trains
    from runner.train.launch import bf16_enabled

    cur = ctx.need(Curated)
    ctx.pools.close()
    ctx.ensure_ray()
    s = ctx.spec
    train = s.train.model_copy(update={"bf16": bf16_enabled(s.train)})  # "auto" resolved, once
    say(f"  {train.method}, {train.finetune}, {'bf16' if train.bf16 else 'fp32'}, {train.workers} worker(s) per "
        f"worker group; a cell alone: DeepSpeed ZeRO-{train.zero_stage}")
    # Ray Train's run names and every work dir end with the cell's key: a cell of other settings
    # (a changed train.lr) never resumes this one's checkpoints, nor publishes its leftovers
    by_id = {f"{safe_name(r.run_id)}-{r.cell_key}": r for r in todo}
    grid = [Cell(cell_id=cid, key=cell_unit(ctx, r).key, seed=r.seed or 0, train=_cell_train(train, r),  # a cell has a seed
                 steps=r.step,  # its optimizer steps where the runs carry them (runner.train.doses), else epochs
                 pairs=str(cur.subset(r.condition)),
                 model_path=ctx.model_path(r.model), model_id=ctx.model_id(r.model),
                 out_dir=str(cell_unit(ctx, r).dir), work_dir=str(ctx.root / "ray_train"),
                 ref_cache=str(ctx.root / "cache" / "reflogps"), chat_template=ctx.chat_template(r.model),
                 system_prompt=training_system_prompt(train, r.condition),
                 trust_remote_code=s.model(r.model).trust_remote_code) for cid, r in by_id.items()]
    groups = group_cells(ctx, train, grid)
    if any(len(g.cells) > 1 for g in groups):
        say(f"  {len(grid)} cells in {len(groups)} worker group(s) of "
            f"{', '.join(f'{len(g.cells)} ({g.per_forward} per forward)' for g in groups)}: LoRA adapters of "
            f"one base model train together, data parallel (train.adapters_per_group: {s.train.adapters_per_group})")
    errors = _run_groups(ctx, groups, train, by_id)
    failed = []
    for cid, r in by_id.items():
        err = errors.get(cid, "the trial did not run")
        adopt(ctx, r)
        unit = cell_unit(ctx, r)
        if err is None and unit.cached():
            last = last_metrics(unit.dir)
            say(f"  {r.run_id}: loss {last.get('loss', float('nan')):.4f}, "
                f"reward accuracy {last.get('rewards/accuracy', float('nan')):.2f}")
        else:  # one failed cell must not lose the others
            unit.mark_failed(err or "no model was written")
            failed.append(f"{r.run_id}: {err}")
    if failed:
        raise StageError(f"train: {len(failed)} cell(s) failed: " + "; ".join(failed))


def _run_groups(ctx: StudyContext, groups: list[Group], train: TrainSpec,
                by_id: dict[str, Run]) -> dict[str, str | None]:
    """run_grid over the groups; the groups that ran out of memory (at one adapter per forward, or in
    the optimizer step) then run again split in two, each adapter from its checkpoint, until none does
    (or only lone cells do). Returns cell_id -> error (None: trained)."""
    # deferred: Ray and torch (the trainer), imported only when a cell trains
    from runner.sweep import run_grid
    from runner.train.group import out_of_memory

    name = f"grid-{content_hash(list(by_id), n=8)}"
    errors: dict[str, str | None] = {}
    for attempt in range(len(by_id)):  # each round halves a group: log2(cells) rounds at most
        errors.update(run_grid(groups, train, ctx.root / "ray_tune", name + (f"-split{attempt}" if attempt else ""),
                               on_complete=lambda c: adopt(ctx, by_id[c.cell_id]), cluster=ctx.spec.cluster))
        for r in by_id.values():
            adopt(ctx, r)
        groups = split_out_of_memory(groups, lambda c: not cell_unit(ctx, by_id[c.cell_id]).cached())
        if not groups:
            break
        notes = sorted({n for g in groups for c in g.cells if (n := out_of_memory(c))})
        say(f"  out of memory in {'; '.join(notes)}: {len(groups)} smaller group(s) of "
            f"{', '.join(str(len(g.cells)) for g in groups)}, each adapter resuming from its checkpoint")
    return errors


def split_out_of_memory(groups: list[Group], unpublished: Callable[[Cell], bool]) -> list[Group]:
    """Each group of several cells that ran out of memory (runner.train.group.splittable: its note names a
    group of more than one) as two halves of its `unpublished` cells, at one adapter per forward;
    nothing for the others (a cell that ran out of memory alone cannot be split: its error stands)."""
    from runner.train.group import splittable  # deferred: torch, imported only when a cell trains

    out = []
    for g in groups:
        left = [c for c in g.cells if unpublished(c)]
        if len(g.cells) == 1 or not any(splittable(c) for c in left):
            continue
        if len(left) > 1:
            half = (len(left) + 1) // 2
            out += [Group(tuple(left[:half]), 1), Group(tuple(left[half:]), 1)]
        else:
            out.append(Group((left[0],), 1))  # trains as a group of one, from its checkpoint (runner.sweep)
    return out


def _cell_train(train: TrainSpec, r: Run) -> TrainSpec:
    """A cell's train section: train.eval_at_steps become fractions of its own schedule (r.step steps),
    which the workers save at (runner.train.loop.progress_steps gives back the steps)."""
    if not train.eval_at_steps or r.step is None:
        return train
    return train.model_copy(update={"eval_at": step_fractions(train, r.step, r.condition)})


def group_cells(ctx: StudyContext, train: TrainSpec, cells: list[Cell]) -> list[Group]:
    """The cells as training Groups: per base model, at most train.adapters_per_group adapters ("auto":
    all) in groups of no fewer than the cluster runs at once, with as many micro-batches per forward
    as a worker's memory holds (runner.train.memory.adapters_per_group)."""
    # deferred: Ray (the cluster's resources), imported only when a cell trains
    import ray

    slots = max_concurrent(train, ctx.spec.cluster)
    budget = worker_budget_gb(train, ctx.spec.cluster.gpu_memory_gb if ctx.spec.cluster else 80,
                              ray.cluster_resources())  # type: ignore[no-untyped-call]  # (ray's stub)
    by_model: dict[str, list[Cell]] = {}
    for c in cells:
        by_model.setdefault(c.model_id, []).append(c)
    share = max(1, slots // len(by_model))
    groups: list[Group] = []
    for model_id, cs in by_model.items():
        m = next(m for m in ctx.spec.models if ctx.model_id(m.name) == model_id)
        p = params_b(m.name, m.path, m.params_b)
        n, per = group_layout(p, train, budget, len(cs), share, model_shape(p, cs[0].model_path))
        groups += [Group(tuple(cs[i::n]), min(per, len(cs[i::n]))) for i in range(n)]
    return groups


def adopt(ctx: StudyContext, r: Run) -> None:
    """Mark a cell done as soon as train_cell has published it (an atomic rename of a finished dir
    whose cell.json names this cell's key)."""
    unit = cell_unit(ctx, r)
    if (not unit.cached() and (unit / "model").is_dir()
            and (read_state(unit / "cell.json") or {}).get("key") == unit.key):
        unit.mark_done({"run_id": r.run_id}, inputs=[CURATE.unit(ctx)])


def last_metrics(unit: Path) -> dict[str, Any]:
    lines = (unit / "metrics.jsonl").read_text().splitlines()
    last: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return last


def cell_timings(ctx: StudyContext) -> list[dict[str, Any]]:
    """Each trained cell's wall time and the part of it outside its optimizer steps (worker group
    and process group start, model load, DeepSpeed initialisation, checkpoint copies; in a group,
    also the wait for the group's other adapters); `group`: the cells trained with it, if any."""
    out = []
    for r in ctx.runs():
        f = cell_unit(ctx, r) / "cell.json" if r.cell_key and r.final else None
        meta = (read_state(f) or {}) if f else {}
        if timing := meta.get("timing"):
            wall = timing["end"] - timing["start"]
            out.append({"run": r.run_id, **timing, "wall_s": wall, "overhead_s": wall - timing["steps_s"],
                        "group": meta.get("group")})
    return out


def log_training(ctx: StudyContext, cells: list[Run]) -> None:
    """One child run per cell: the train section as it ran (cell.json: bf16 resolved), its loss history,
    its model."""
    tr = ctx.tracker
    for r in cells:
        unit = cell_unit(ctx, r)
        ran = read_json(unit / "cell.json")  # verified with its unit: readable
        rid = log_run(tr, r, {**flatten("train", ran["train"]), "cell_key": unit.key, "curate_key": CURATE(ctx),
                              "model_revision": ctx.model_revision(r.model) or "",
                              "system_prompt_text": ran.get("system_prompt") or "",  # this cell's, resolved
                              "steps": ran.get("steps", ""), "epochs": ran.get("epochs", "")})  # its dose

        def log(rid: str = rid, unit: Unit = unit) -> None:
            tr.log_history(rid, [json.loads(x) for x in (unit / "metrics.jsonl").read_text().splitlines()])
            tr.log_artifacts(rid, unit / "model", "model")
            tr.log_artifacts(rid, unit / "cell.json")
        tr.once(rid, f"train-{unit.key}", log)
