"""Launch one training cell (model × condition × seed) as a Ray Train TorchTrainer with DeepSpeed.

The reference log-probs are computed once per (model, subset, tokenisation) at step 0 inside the
worker group, on all its workers (runner.train.reference.worker_references), and cached on disk
under a content hash: the driver reads the cache and hands the workers the subsets it lacks.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import ray
import torch

from evaluation.errors import ValindError
from runner.progress import say
from runner.spec import TrainSpec, content_hash
from runner.store import atomic_dir
from runner.train.batches import Example, encode_pairs
from runner.train.cell import Cell
from runner.train.doses import epochs_of
from runner.train.group import final_dir, finished, group_loop, out_of_memory, splittable
from runner.train.loop import dist_backend, progress_dir, starts_file, train_loop
from runner.train.reference import cache_paths, cached_logps, fill, subsets_logps


class TrainError(ValindError, RuntimeError):
    pass


def compute_reference_logps(model_path: str, examples: list[Example], micro: int, threads: int,
                            trust_remote_code: bool, bf16: bool = False) -> list[tuple[float, float]]:
    """(chosen, rejected) summed response log-probs of the frozen base model, in example order.

    In the policy's precision: with bf16 training, fp32 references would differ from the policy's
    own log-probs at step 0 by rounding summed over the response, and DPO would start off log 2."""
    return subsets_logps(model_path, [examples], micro, threads, trust_remote_code, bf16)[0]


def reference_logps(cell: Cell, subsets: list[list[Example]]) -> list[str | None]:
    """Fill ref_chosen/ref_rejected of each subset's examples from the cache. Returns, per subset, None
    (a cache hit, or SFT, which has no reference) or the cache file the worker group computes and writes
    at step 0 (runner.train.reference.worker_references).

    In the cell's precision (cell.train.bf16, resolved by the driver), which is part of the cache key."""
    train = cell.train
    if train.method == "sft":
        return [None] * len(subsets)
    out: list[str | None] = []
    for examples, path in zip(subsets, cache_paths(cell.model_id, train.bf16, subsets, cell.ref_cache)):
        values = cached_logps(path, len(examples))
        if values is not None:
            fill(examples, values)
        out.append(None if values is not None else str(path))
    return out


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 (Linux): bf16 matmuls there run about 2x fp32; elsewhere they are emulated."""
    try:
        return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


@ray.remote
def _native_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


@functools.lru_cache
def _auto_bf16(gpus_per_worker: float) -> bool:
    # Asked where a training worker would run: the driver may sit on a node without the GPUs.
    task = _native_bf16.options(num_cpus=0, num_gpus=min(1.0, gpus_per_worker), scheduling_strategy="DEFAULT")
    return ray.get(task.remote())


def bf16_enabled(train: TrainSpec) -> bool:
    """train.bf16, with "auto" resolved: on where the hardware does bf16 natively (GPUs that support
    it, CPUs with AMX or AVX512-BF16), off elsewhere. The driver calls it once, before building the
    Cells (whose train.bf16 must be a bool); nothing downstream resolves it again."""
    if train.bf16 == "auto":
        return _auto_bf16(train.gpus_per_worker)
    return bool(train.bf16)


def _encoded(cell: Cell, tokenizer) -> list[Example]:
    """The cell's tokenised pairs (without reference log-probs)."""
    train = cell.train
    examples = encode_pairs(tokenizer, pd.read_parquet(cell.pairs), train.max_length, cell.chat_template,
                            cell.system_prompt)
    if len(examples) < train.batch_size:
        raise TrainError(f"{cell.cell_id}: {len(examples)} pairs is fewer than train.batch_size ({train.batch_size})")
    return examples


def _trainer(loop, cfg: dict, train: TrainSpec, name: str, work_dir: str):
    # deferred: Ray Train takes ~2 s to import, only when a cell trains
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = train.gpus_per_worker > 0
    resources = {"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=dist_backend(train)),
        run_config=RunConfig(name=name, storage_path=work_dir,
                             failure_config=FailureConfig(max_failures=train.max_failures)),
    )


def _fit(loop, cfg: dict, train: TrainSpec, name: str, work_dir: str, what: str):
    """Run a TorchTrainer to its result; a failed worker group (raised by Ray Train V2's fit(), or a
    result without a checkpoint where the loop reports one) is a TrainError naming `what`.

    Ray Train retries a worker group that fails (FailureConfig.max_failures), but when a lost node's
    actor is only *unavailable* as the controller polls it, the controller itself fails, and it
    never retries that. Such a run starts again, up to train.max_failures times: a trainer of the
    same name and storage resumes from its last checkpoint (a group's adapters from their own)."""
    for attempt in range(train.max_failures + 1):
        try:
            return _trainer(loop, cfg, train, name, work_dir).fit()
        except Exception as e:
            lost = _lost_actor(e)
            if lost is None or attempt == train.max_failures:
                raise TrainError(f"{what}: training failed: {e}") from e
            say(f"{what}: the training controller lost an actor ({type(lost).__name__}); starting the run "
                f"again from its last checkpoint ({attempt + 1} of at most {train.max_failures})")


def _lost_actor(e: BaseException) -> BaseException | None:
    """The RayActorError (a dead or unreachable actor) behind a *controller's* failure, if one is.
    A worker group's failures are Ray Train's to retry (FailureConfig), not this one's."""
    # deferred: Ray Train takes ~2 s to import, only when a cell trains
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    cause = e.controller_failure if isinstance(e, ControllerError) else None
    while cause is not None and not isinstance(cause, RayActorError):
        cause = cause.__cause__
    return cause


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _publish(cell: Cell, model: Path, metrics: Path, n_pairs: int, ref_hit: bool, started: float,
             **extra) -> None:
    """Land a trained cell in cell.out_dir, atomically: model/, progress/<f>/ (train.eval_at),
    metrics.jsonl and cell.json."""
    train = cell.train
    with atomic_dir(Path(cell.out_dir)) as tmp:
        shutil.copytree(model, tmp / "model")
        shutil.copy(metrics, tmp / "metrics.jsonl")
        for f in train.eval_at[:-1]:  # the adapters part-way through (the last fraction is 1: "model")
            if not progress_dir(cell, f).is_dir():
                raise TrainError(f"{cell.cell_id}: the adapter at {f:g} of training (train.eval_at) was not saved")
            shutil.copytree(progress_dir(cell, f), tmp / "progress" / f"{f:g}")
        history = [json.loads(x) for x in metrics.read_text().splitlines()]
        # wall vs steps: the cell's start-up and orchestration overhead (valind rehearse reports it)
        # starts: the step each worker-group start began from ([0, 3]: restarted, resumed at step 3)
        timing = {"start": started, "end": time.time(), "steps_s": sum(h.get("step_s", 0) for h in history),
                  "starts": [int(x) for x in starts_file(cell).read_text().split()]}
        steps = int(history[-1]["step"]) if history else 0
        (tmp / "cell.json").write_text(json.dumps({
            "cell_id": cell.cell_id, "key": cell.key, "seed": cell.seed, "n_pairs": n_pairs, "ref_cache_hit": ref_hit,
            "steps": steps, "epochs": epochs_of(steps, n_pairs, train.batch_size),
            "train": train.model_dump(mode="json"), "bf16": train.bf16, "system_prompt": cell.system_prompt,
            **extra, "timing": timing}, indent=2))


def train_cell(cell: Cell, tokenizer, fail_at_step: int | None = None) -> dict:
    """Train one cell on its pairs (the parquet at cell.pairs) under DeepSpeed; the final adapter (or
    full model) in model/, the ones part-way through in progress/<fraction>/ (train.eval_at),
    metrics.jsonl and cell.json land atomically in cell.out_dir."""
    started = time.time()
    examples = _encoded(cell, tokenizer)
    reference, = reference_logps(cell, [examples])
    ref_hit = reference is None and cell.train.method != "sft"
    cfg = {"cell": cell, "examples": ray.put(examples), "reference": reference, "fail_at_step": fail_at_step,
           "pad_id": _pad_id(tokenizer)}
    result = _fit(train_loop, cfg, cell.train, cell.cell_id, cell.work_dir, cell.cell_id)
    if result.checkpoint is None:
        raise TrainError(f"{cell.cell_id}: training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        _publish(cell, Path(d, "model"), Path(d, "metrics.jsonl"), len(examples), ref_hit, started)
    shutil.rmtree(Path(cell.work_dir) / cell.cell_id, ignore_errors=True)  # Ray's intermediate checkpoints
    return {"out_dir": Path(cell.out_dir), "ref_cache_hit": ref_hit}


def train_group(cells: list[Cell], tokenizer, per_forward: int | None = None,
                fail_at_step: int | None = None) -> dict[str, dict]:
    """Train the LoRA cells of one base model together (runner.train.group): one worker group, one
    frozen base, an adapter per cell, `per_forward` adapters' micro-batches per forward (default
    all). Each cell lands in its out_dir as train_cell lands it; a cell whose adapter finished in an
    earlier group that did not end lands without training again."""
    started = time.time()
    train = cells[0].train
    # eval_at may differ (train.eval_at_steps are other fractions of other schedules): the workers read each cell's
    if len({(c.model_path, c.train.model_dump_json(exclude={"eval_at"})) for c in cells}) != 1 or train.finetune != "lora":
        raise TrainError("a group trains LoRA cells of one base model and one train section")
    # seeds of one condition share their subset: tokenised, referenced and put in the object store
    # once; the references the cache lacks come from the group's workers at step 0
    subsets: dict[tuple, list[Example]] = {}
    for c in cells:
        if (c.pairs, c.system_prompt) not in subsets:
            subsets[c.pairs, c.system_prompt] = _encoded(c, tokenizer)
    refs = reference_logps(cells[0], list(subsets.values()))
    shared = {k: (ex, ref, ray.put(ex)) for (k, ex), ref in zip(subsets.items(), refs)}
    prepared = {c.cell_id: shared[c.pairs, c.system_prompt] for c in cells}
    todo = [c for c in cells if not finished(c)]
    if todo:
        name = f"group-{content_hash([c.cell_id for c in todo], n=8)}"
        cfg = {"cells": todo, "examples": [prepared[c.cell_id][2] for c in todo], "pad_id": _pad_id(tokenizer),
               "references": [prepared[c.cell_id][1] for c in todo], "per_forward": per_forward,
               "fail_at_step": fail_at_step}
        try:
            _fit(group_loop, cfg, train, name, cells[0].work_dir,
                 f"group of {len(todo)} ({', '.join(c.cell_id for c in todo)})")
        finally:
            shutil.rmtree(Path(cells[0].work_dir) / name, ignore_errors=True)
    out = {}
    for c in filter(finished, cells):
        examples, reference, _ = prepared[c.cell_id]
        ref_hit = reference is None and train.method != "sft"
        _publish(c, final_dir(c) / "model", final_dir(c) / "metrics.jsonl", len(examples), ref_hit, started,
                 group=[x.cell_id for x in cells])
        shutil.rmtree(Path(c.work_dir) / c.cell_id, ignore_errors=True)
        out[c.cell_id] = {"out_dir": Path(c.out_dir), "ref_cache_hit": ref_hit}
    # out of memory in a group of several: runner.stages.train trains its cells in smaller groups, not an error here
    if stuck := [c for c in cells if c.cell_id not in out and not splittable(c)]:
        oom = out_of_memory(stuck[0])
        raise TrainError(f"{stuck[0].cell_id}: " + (f"out of memory in {oom}" if oom
                                                    else "the group ended without this adapter's final state"))
    return out
