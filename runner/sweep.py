"""The training grid on Ray Tune: one trial per (model, condition, seed) cell.

Under Ray Train V2 a TorchTrainer cannot be a Tune trainable, so each trial is a function that
launches the cell's TorchTrainer (with TuneReportCallback forwarding worker reports to Tune).
The trial itself holds no CPU and runs on the head node: its trainer's worker group asks for the
resources. Concurrency comes from the cluster: as many trials as worker groups fit at once.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import ray

from runner.spec import ClusterSpec, TrainSpec
from runner.train.cell import Cell

HEAD = "node:__internal_head__"  # a resource only the head node has


def max_concurrent(train: TrainSpec, cluster: ClusterSpec | None = None, resources: dict | None = None) -> int:
    """How many cells' worker groups fit at once. GPU cells are sized from the spec's `cluster` when
    it declares one: an autoscaling cluster shows few or no GPUs at start-up (min_workers: 0), and
    sizing from that would run the whole grid one cell at a time."""
    res = ray.cluster_resources() if resources is None else resources
    if train.gpus_per_worker > 0:
        gpus = max(res.get("GPU", 0), cluster.nodes * cluster.gpus_per_node if cluster else 0)
        fit = gpus / (train.gpus_per_worker * train.workers)
    else:
        fit = res.get("CPU", 1) / (train.cpus_per_worker * train.workers)
    return max(1, math.floor(fit))


def _trial(config: dict) -> None:
    """A Tune trial: train one cell (its output is published atomically to cell.out_dir).

    Ray Train's reports are not forwarded to Tune (no TuneReportCallback): nothing reads them there
    (a cell's metrics are its metrics.jsonl), and the forwarding queue could deadlock the trial at
    its end: the trial's main thread blocked on a full result queue that only it consumes (seen in
    CI with Ray 2.60: `_get_result_from_queues` → `report` → `Queue.put`)."""
    from transformers import AutoTokenizer

    from runner.train.launch import train_cell

    cell: Cell = config["cell"]
    tokenizer = AutoTokenizer.from_pretrained(cell.model_path, trust_remote_code=cell.trust_remote_code)
    train_cell(cell, tokenizer=tokenizer)


def run_grid(cells: list[Cell], train: TrainSpec, storage: Path, name: str,
             on_complete: Callable[[Cell], None] | None = None,
             cluster: ClusterSpec | None = None) -> dict[str, str | None]:
    """Run the cells as Tune trials (Tune grid-searches over the Cell objects themselves); returns
    cell_id → error text (None when it succeeded). `train` and `cluster` size the concurrency.

    `on_complete(cell)` runs in the driver as soon as a trial finishes, so a finished cell is
    marked done even if the driver is killed before the whole grid is over."""
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"cell ids must be unique: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    import os

    from ray import tune

    from runner.progress import progress, say

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no experiment banner: our own bar reports progress

    class Progress(tune.Callback):
        def __init__(self, bar):
            self.bar = bar

        def on_trial_complete(self, iteration, trials, trial, **info):
            if on_complete is not None:
                on_complete(trial.config["cell"])
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"  trial {trial.config['cell'].cell_id} failed")
            self.bar.update(1)

    concurrency = max_concurrent(train, cluster)
    say(f"  {len(cells)} cell(s) as Ray Tune trials, up to {concurrency} at once")
    # Trials run on the head, and with them Ray Train's controllers (attached to the trial's node):
    # a lost worker node then costs its workers, which Ray Train restarts from the last checkpoint,
    # never the trial that drives them.
    trainable = tune.with_resources(_trial, {"CPU": 0, "memory": 200 * 1024 ** 2, HEAD: 0.001})
    with progress(total=len(cells), desc="train cells") as bar:
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(cells)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[Progress(bar)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
    out: dict[str, str | None] = {}
    for res in grid:
        cid = res.config["cell"].cell_id
        out[cid] = _last_line(res.error) if res.error else None
    return out


def _last_line(err: BaseException) -> str:
    """The final 'Type: message' line of a (possibly nested, remote) error."""
    lines = [x for x in str(err).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(err).__name__
