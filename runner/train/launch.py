"""Launch one training cell (model × condition × seed) as a Ray Train TorchTrainer with DeepSpeed.

The reference log-probs are computed once per (model, subset, tokenisation) by a Ray task and
cached on disk under a content hash, so no reference forward pass runs during training.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import ray
import torch

from runner.spec import TrainSpec, content_hash
from runner.store import atomic_dir
from runner.train.batches import Example, encode_pairs


class TrainError(RuntimeError):
    pass


def compute_reference_logps(model_path: str, examples: list[Example], micro: int, threads: int,
                            trust_remote_code: bool, bf16: bool = False) -> list[tuple[float, float]]:
    """(chosen, rejected) summed response log-probs of the frozen base model, in example order.

    In the policy's precision: with bf16 training, fp32 references would differ from the policy's
    own log-probs at step 0 by rounding summed over the response, and DPO would start off log 2."""
    from transformers import AutoModelForCausalLM

    from runner.train.batches import pair_batch, response_logps

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 trust_remote_code=trust_remote_code).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), micro):
            chunk = examples[i:i + micro]
            b = {k: v.to(device) for k, v in pair_batch(chunk, pad).items()}
            lp = response_logps(model, b).cpu()
            out += list(zip(lp[:len(chunk)].tolist(), lp[len(chunk):].tolist()))
    return out


_reference_logps = ray.remote(compute_reference_logps)


def reference_logps(model_path: str, model_id: str, examples: list[Example], train: TrainSpec,
                    cache_dir: Path, trust_remote_code: bool = False) -> tuple[list[Example], bool]:
    """Fill ref_chosen/ref_rejected from the cache, computing (and caching) them if missing."""
    bf16 = bf16_enabled(train)
    key = content_hash("reflogps-v1", model_id, [(e.pair_id, e.prompt, e.chosen, e.rejected) for e in examples],
                       *(["bf16"] if bf16 else []))
    path = cache_dir / f"{key}.json"
    hit = path.exists()
    if hit:
        values = json.loads(path.read_text())
    else:
        threads = int(train.cpus_per_worker * train.workers)
        # DEFAULT: inside a Tune trial the task must not be captured by the trial's placement group
        task = _reference_logps.options(num_cpus=train.cpus_per_worker * train.workers,
                                        num_gpus=min(1.0, train.gpus_per_worker), scheduling_strategy="DEFAULT")
        values = ray.get(task.remote(model_path, examples, 4, threads, trust_remote_code, bf16))
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)
    for e, (c, r) in zip(examples, values):
        e.ref_chosen, e.ref_rejected = c, r
    return examples, hit


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
    it, CPUs with AMX or AVX512-BF16), off elsewhere."""
    if train.bf16 == "auto":
        return _auto_bf16(train.gpus_per_worker)
    return bool(train.bf16)


def train_cell(*, cell_id: str, pairs: pd.DataFrame, model_path: str, model_id: str, tokenizer, seed: int,
               train: TrainSpec, out_dir: Path, work_dir: Path, ref_cache: Path, chat_template: str | None = None,
               trust_remote_code: bool = False, fail_at_step: int | None = None, callbacks: list | None = None) -> dict:
    """Train one cell; the final adapter (or full model) and metrics.jsonl land atomically in out_dir."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from runner.train.loop import train_loop

    examples = encode_pairs(tokenizer, pairs, train.max_length, chat_template)
    if len(examples) < train.batch_size:
        raise TrainError(f"{cell_id}: {len(examples)} pairs is fewer than train.batch_size ({train.batch_size})")
    ref_hit = False
    if train.method != "sft":
        examples, ref_hit = reference_logps(model_path, model_id, examples, train, ref_cache, trust_remote_code)
    use_gpu = train.gpus_per_worker > 0
    cfg = {
        "model": model_path, "trust_remote_code": trust_remote_code, "examples": ray.put(examples),
        "seed": seed, "method": train.method, "finetune": train.finetune, "lora": train.lora.model_dump(),
        "beta": train.beta, "label_smoothing": train.label_smoothing, "lr": train.lr, "epochs": train.epochs,
        "batch_size": train.batch_size, "micro_batch_size": train.micro_batch_size, "zero_stage": train.zero_stage,
        "bf16": bf16_enabled(train), "backend": "nccl" if use_gpu else "gloo", "threads": train.cpus_per_worker,
        "report_every": train.report_every, "checkpoint_every": train.checkpoint_every,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, "fail_at_step": fail_at_step,
    }
    resources = {"CPU": train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=cfg["backend"]),
        run_config=RunConfig(name=cell_id, storage_path=str(work_dir), callbacks=callbacks or [],
                             failure_config=FailureConfig(max_failures=train.max_failures)),
    )
    result = trainer.fit()
    if result.error or result.checkpoint is None:
        raise TrainError(f"{cell_id}: training failed: {result.error}")
    with result.checkpoint.as_directory() as d, atomic_dir(out_dir) as tmp:
        shutil.copytree(Path(d, "model"), tmp / "model")
        shutil.copy(Path(d, "metrics.jsonl"), tmp / "metrics.jsonl")
        (tmp / "cell.json").write_text(json.dumps({
            "cell_id": cell_id, "seed": seed, "n_pairs": len(examples), "ref_cache_hit": ref_hit,
            "train": train.model_dump(mode="json"), "bf16": cfg["bf16"]}, indent=2))
    shutil.rmtree(work_dir / cell_id, ignore_errors=True)  # Ray's intermediate checkpoints
    return {"out_dir": out_dir, "ref_cache_hit": ref_hit}
