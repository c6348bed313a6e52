"""The score stage's QA benchmarks (lm-evaluation-harness), one store unit per run (folder `qa`).

Each run's items are saved as its task ends, through a `ray.wait` loop with a bounded number of
tasks in flight (results never pile up in the driver or the object store); a transient error (a
worker or node lost, an I/O error) is retried a bounded number of times, a deterministic one
fails that run's unit at once and the others go on. A rerun computes only the runs not saved.
"""
from __future__ import annotations

import errno
import os
from collections import deque
from pathlib import Path
from typing import Any, Literal

import ray
from ray import exceptions as rx

from evaluation.benchmarks import run_benchmarks
from runner.context import Run, StageError, StudyContext
from runner.progress import say
from runner.stages.keys import Key
from runner.stages.train import adapter_path, cell_unit
from runner.stages.unit import producing
from runner.store import write_parquet

QA = Key("qa", {
    "run": lambda c, r: r.run_id,  # its rows are the run's own (two models of the same weights: two units)
    "model": lambda c, r: c.model_id(r.model),
    "train cell": lambda c, r: r.cell_key or "base",
    # under train.eval_at_steps the run id names the step, and the share needs the subsets' sizes
    "progress (train.eval_at)": lambda c, r: None if c.spec.train.eval_at_steps else r.progress,
    "score.benchmarks": lambda c, r: [c.spec.score.benchmarks, c.spec.score.benchmark_limit,
                                      c.spec.score.benchmark_backend],
    "engine dtype": lambda c, r: c.engine_spec(r.model).dtype,  # QA runs in the precision generation runs in
    "data dir": lambda c, r: c.data_marker(),
}, per_run=True)

RETRIES = 2  # further tries of a run's task after a transient error
SLACK = 2    # tasks queued beyond what the cluster can run at once, so no slot idles between two
# Deterministic OSErrors: a retry would meet the same file, permission or path
_LASTING_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# VALIND_QA_FAULT="<run_id>=crash|oserror|error,...": fault injection for the resume and retry tests.
# crash and oserror hit the run's first try only (its worker exits; an EIO), error every try (an
# unknown benchmark task, as a misconfigured task would).
FAULT_ENV = "VALIND_QA_FAULT"


def qa_path(ctx: StudyContext, r: Run) -> Path:
    return QA.unit(ctx, r) / "qa.parquet"


def transient(e: BaseException) -> bool:
    """Whether a QA task's error may pass on a retry: its worker, node or result lost, or an I/O
    error (a shared filesystem's hiccup); not an error of the task's own code or inputs."""
    lost = tuple(getattr(rx, n) for n in ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                                          "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError",
                                          "OutOfMemoryError", "RaySystemError")
                 if hasattr(rx, n))
    if isinstance(e, lost):
        return True
    cause = e.cause if isinstance(e, rx.RayTaskError) else e
    return isinstance(cause, OSError) and not isinstance(cause, _LASTING_OS_ERRORS)


def _faults() -> dict[str, str]:
    spec = os.environ.get(FAULT_ENV, "")
    return dict(part.split("=", 1) for part in spec.split(",") if "=" in part)


def run_qa(ctx: StudyContext, runs: list[Run]) -> dict[str, str]:
    """Every run's QA unit, computing the missing ones; the runs whose QA failed, with the error
    (the others' units are done: `qa_path`)."""
    todo = [r for r in runs if not QA.unit(ctx, r).cached()]
    say(f"  QA benchmarks ({', '.join(ctx.spec.score.benchmarks)}): {len(runs)} runs, "
        f"{len(runs) - len(todo)} cached")
    if not todo:
        return {}
    with producing([QA.unit(ctx, r) for r in todo], "QA benchmarks"):  # an error of the loop itself
        return _compute(ctx, todo)


def _compute(ctx: StudyContext, todo: list[Run]) -> dict[str, str]:
    """One Ray task per run: on a cluster on a GPU; on CPUs each takes one CPU and computes on one
    thread, as many at a time as there are CPUs (a task's fixed costs, lm-eval's set-up and the model
    load, are serial: tasks side by side beat one task on every core)."""
    s, data_dir = ctx.spec.score, ctx.data_dir
    if data_dir is None:  # refused before any compute (runner.preflight.data_dir_problems)
        raise StageError("score: the QA benchmarks are read from the data directory, and data.data_dir is not set")
    ctx.ensure_ray()
    faults = _faults()

    def submit(r: Run, attempt: int) -> Any:
        adapter = str(adapter_path(ctx, r)) if r.cell_key else None
        model = ctx.model_path(r.model)
        if adapter and ctx.spec.train.finetune == "full":
            model, adapter = adapter, None
        e = ctx.engine_spec(r.model)
        fault = faults.get(r.run_id)
        # retries are this loop's (counted, logged), not Ray's
        task = _run_benchmarks.options(num_cpus=1, num_gpus=min(1.0, e.gpus_per_actor), max_retries=0)
        return task.remote(model, adapter, [f"valind_{b}" for b in s.benchmarks], data_dir, s.benchmark_limit,
                           s.benchmark_backend, s.benchmark_batch_size, "cuda" if e.gpus_per_actor else "cpu",
                           e.dtype, fault if fault == "error" or attempt == 0 else None)

    pending, tries = deque(todo), {r.run_id: 0 for r in todo}
    running: dict[Any, Run] = {}
    failed: dict[str, str] = {}
    done = 0
    while pending or running:
        while pending and len(running) < _cap(ctx, pending[0]):
            r = pending.popleft()
            running[submit(r, tries[r.run_id])] = r
        ready, _ = ray.wait(list(running), num_returns=1)
        r = running.pop(ready[0])
        unit = QA.unit(ctx, r)
        try:
            df = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 -- sorted into transient and lasting just below
            why = _brief(e)
            if transient(e) and tries[r.run_id] < RETRIES:
                tries[r.run_id] += 1
                say(f"  QA {r.run_id}: {why} (transient): try {tries[r.run_id] + 1} of {RETRIES + 1}")
                pending.append(r)
                continue
            kind = "transient, retries spent" if transient(e) else "not retried"
            unit.mark_failed(f"QA benchmarks {r.run_id} ({kind}): {type(e).__name__}: {e}")
            failed[r.run_id] = why
            say(f"  QA {r.run_id}: failed ({kind}): {why}")
            continue
        write_parquet(df.assign(run_id=r.run_id), qa_path(ctx, r))
        unit.mark_done({"run_id": r.run_id, "rows": len(df), "tries": tries[r.run_id] + 1},
                       inputs=[cell_unit(ctx, r)] if r.cell_key else [])
        done += 1
        say(f"  QA {r.run_id}: {len(df)} items saved ({done} of {len(todo)})")
        del df  # one run's table at a time in the driver
    return failed


def _cap(ctx: StudyContext, r: Run) -> int:
    """Tasks in flight: what the cluster can run at once (its GPUs, or CPUs for CPU tasks) plus SLACK."""
    gpus = ctx.engine_spec(r.model).gpus_per_actor
    res = ray.cluster_resources()  # type: ignore[no-untyped-call]  # (ray's stub)
    slots = int(res.get("GPU", 0) // min(1.0, gpus)) if gpus else int(res.get("CPU", 1))
    return max(1, slots) + SLACK


def _brief(e: BaseException) -> str:
    """An error in one line: the task's own exception, not Ray's wrapping of it."""
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def raise_failed(failed: dict[str, str]) -> None:
    if failed:
        raise StageError(f"score: QA benchmarks failed for {len(failed)} run(s): "
                         + "; ".join(f"{k}: {v}" for k, v in failed.items())
                         + ". The other runs' QA and scores are saved; a rerun computes only these")


@ray.remote
def _run_benchmarks(model: str, adapter: str | None, tasks: list[str], data_dir: Path, limit: int | None,
                    backend: Literal["hf", "vllm"], batch_size: int, device: str, dtype: str, fault: str | None = None) -> Any:
    import torch  # deferred: torch, imported in the Ray task's worker only

    if fault == "crash":
        os._exit(1)  # the worker dies as on a lost node: Ray reports WorkerCrashedError
    if fault == "oserror":
        raise OSError(errno.EIO, "injected I/O error (VALIND_QA_FAULT)")
    if fault == "error":
        tasks = [*tasks, "valind_no_such_task"]  # refused by run_benchmarks as any unknown task is
    torch.set_num_threads(1)  # its one CPU
    _, per_item = run_benchmarks(model, adapter, tasks, data_dir, limit=limit, backend=backend,
                                 batch_size=batch_size, device=device, dtype=dtype)
    return per_item

