"""The training grid on Ray Tune: one trial per group of cells (a lone cell, or the LoRA cells of one
base model trained together, runner.train.group).

Under Ray Train V2 a TorchTrainer cannot be a Tune trainable, so each trial is a function that
launches its TorchTrainer.
The trial itself holds no CPU and runs on the head node: its trainer's worker group asks for the
resources. Concurrency comes from the cluster: as many trials as worker groups fit at once.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import ray

from runner.capacity import max_concurrent
from runner.progress import progress, say
from runner.spec import ClusterSpec, TrainSpec
from runner.train.cell import Cell, Group

HEAD = "node:__internal_head__"  # a resource only the head node has


def _trial(config: dict) -> None:
    """A Tune trial: train one cell alone, or a group together (each cell is published atomically to
    its out_dir).

    Ray Train's reports are not forwarded to Tune (no TuneReportCallback): nothing reads them there
    (a cell's metrics are its metrics.jsonl), and the forwarding queue could deadlock the trial at
    its end: the trial's main thread blocked on a full result queue that only it consumes (seen in
    CI with Ray 2.60: `_get_result_from_queues` → `report` → `Queue.put`)."""
    # deferred: transformers, torch and deepspeed (runner.train.launch) load in the trial's process only
    from transformers import AutoTokenizer
    from runner.train.group import checkpoint_dir
    from runner.train.launch import train_cell, train_group

    group: Group = config["group"]
    first = group.cells[0]
    tokenizer = AutoTokenizer.from_pretrained(first.model_path, trust_remote_code=first.trust_remote_code)
    # fault injection (tests/test_train_state.py): a worker dies after this optimizer step, first attempt only
    fail = int(os.environ["VALIND_FAIL_AT_STEP"]) if os.environ.get("VALIND_FAIL_AT_STEP") else None
    # a lone cell split off a group that ran out of memory (runner.stages.train) resumes its adapter there
    if len(group.cells) == 1 and not (checkpoint_dir(first) / "state.json").is_file():
        train_cell(first, tokenizer=tokenizer, fail_at_step=fail)
    else:
        train_group(list(group.cells), tokenizer=tokenizer, per_forward=group.per_forward, fail_at_step=fail)


def run_grid(groups: list[Group], train: TrainSpec, storage: Path, name: str,
             on_complete: Callable[[Cell], None] | None = None,
             cluster: ClusterSpec | None = None) -> dict[str, str | None]:
    """Run each Group of cells as a Tune trial (Tune grid-searches over the Groups themselves);
    returns cell_id → error text (None when it succeeded). `train` and `cluster` size the concurrency.

    `on_complete(cell)` runs in the driver as soon as a trial finishes, for each of its cells, so a
    finished cell is marked done even if the driver is killed before the whole grid is over."""
    ids = [c.cell_id for g in groups for c in g.cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"cell ids must be unique: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    # deferred: ray.tune (~0.6 s) and torch (runner.train.loop) only when a grid runs
    from ray import tune
    from runner.train.loop import steps_done

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no experiment banner: our own bar reports progress

    class Progress(tune.Callback):
        def __init__(self, bar):
            self.bar, self.polled = bar, 0.0

        def on_trial_complete(self, iteration, trials, trial, **info):
            for cell in trial.config["group"].cells:
                if on_complete is not None:
                    on_complete(cell)
            self.bar.update(len(trial.config["group"].cells))

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.polled >= 5:  # the cells' step notes, for long groups
                self.polled = time.monotonic()
                done, total = steps_done([c for g in groups for c in g.cells])
                if total:
                    self.bar.set_postfix_str(f"optimizer steps {done}/{total} of the started cells")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"  trial {', '.join(c.cell_id for c in trial.config['group'].cells)} failed")
            self.bar.update(len(trial.config["group"].cells))

    concurrency = max_concurrent(train, cluster)
    say(f"  {len(groups)} Ray Tune trial(s) for {len(ids)} cell(s), up to {concurrency} at once")
    # Trials run on the head, and with them Ray Train's controllers (attached to the trial's node):
    # a lost worker node then costs its workers, which Ray Train restarts from the last checkpoint,
    # never the trial that drives them.
    trainable = tune.with_resources(_trial, {"CPU": 0, "memory": 200 * 1024 ** 2, HEAD: 0.001})
    with progress(total=len(ids), desc="train cells") as bar:
        tuner = tune.Tuner(
            trainable,
            param_space={"group": tune.grid_search(groups)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[Progress(bar)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
    out: dict[str, str | None] = {}
    for res in grid:
        for cell in res.config["group"].cells:
            out[cell.cell_id] = _last_line(res.error) if res.error else None
    return out


def _last_line(err: BaseException) -> str:
    """The final 'Type: message' line of a (possibly nested, remote) error."""
    lines = [x for x in str(err).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(err).__name__
