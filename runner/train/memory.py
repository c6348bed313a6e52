"""Peak memory of a training worker and how many LoRA adapters one group holds (valind plan, and the
train stage's grouping). Estimates from published activation-memory figures, not measurements."""
from __future__ import annotations

import json
import math
from pathlib import Path


# Peak memory of a training worker: activation bytes per token, hidden unit and layer of a bf16
# transformer without recomputation (Korthikanti et al. 2022, https://arxiv.org/abs/2205.05198 §4:
# 34) and with activation checkpointing (each layer's input, 2); both responses' logits over a
# Llama-3-size vocabulary.
ACT_BYTES, ACT_BYTES_CHECKPOINTED, VOCAB = 34, 2, 128_256
# Bytes per logit (position × vocabulary entry) at the peak of runner.train.batches.response_logps:
# four fp32 copies. Forward (8 bytes): the head's output upcast by `.float()` (saved for logsumexp's
# backward; the bf16 output is freed) and logsumexp's exp(x - max) temporary. Backward, at
# logsumexp's node (it runs first): the saved upcast, x - lse, its exp, and that times the incoming
# gradient (16 bytes); gather's scatter gradient comes once the temporaries are freed and is summed
# into logsumexp's gradient in place. Measured on CPU (peak resident memory over that forward and
# backward, bf16 or fp32 head: tests/test_group_memory.py): 16.1 bytes per logit at 1,000 × 128,256
# logits, 16.5 at 200 × 128,256 (a fixed ~25 MB besides). Counted over every token of the pair: an
# upper bound, as only response positions reach the head.
LOGIT_BYTES = 16
# Share of parameters a LoRA adapter trains: by count, rank 16 on attention is ~0.5% of an 8B
# model; 1% leaves room for more target modules.
LORA_TRAINABLE = 0.01
# On CPUs (sdpa's math path, fp32 softmax) a micro-batch measured ~120 bytes per token, hidden unit
# and layer (SmolLM2-135M, bf16, LoRA, 2026-12-01), and a training process holds ~1 GB besides.
ACT_BYTES_CPU, PROCESS_GB_CPU = 120, 1.0


def model_shape(p: float, path: str | None = None) -> tuple[float, float, float]:
    """(hidden size, layers, vocabulary): from the model's config.json when `path` holds one, else
    from the parameter count at Llama's aspect ratio (depth = hidden/128) and Llama-3's vocabulary."""
    try:
        c = json.loads((Path(path) / "config.json").read_text())
        return float(c["hidden_size"]), float(c["num_hidden_layers"]), float(c["vocab_size"])
    except (TypeError, OSError, ValueError, KeyError):
        hidden = (p * 1e9 * 128 / 12) ** (1 / 3)
        return hidden, hidden / 128, float(VOCAB)


def micro_batch_gb(p: float, t, shape: tuple | None = None, cpu: bool = False) -> float:
    """Activations and logits (LOGIT_BYTES) of one micro-batch of chosen+rejected pairs at max_length."""
    hidden, layers, vocab = shape or model_shape(p)
    tokens = 2 * t.micro_batch_size * t.max_length
    full = ACT_BYTES_CPU if cpu else ACT_BYTES
    # with recomputation: every layer's input, and one layer's activations at a time
    per_layer = ACT_BYTES_CHECKPOINTED * layers + full if t.gradient_checkpointing else full * layers
    return (tokens * hidden * per_layer + tokens * vocab * LOGIT_BYTES) / 1e9


def train_memory_gb(p: float, t, shape: tuple | None = None) -> float:
    """Rough peak GPU memory of one training worker: weights, gradients and Adam state (sharded as
    the ZeRO stage says), the activations and logits of one micro-batch of chosen+rejected pairs."""
    n = p * 1e9
    width = 2 if t.bf16 in (True, "auto") else 4  # "auto" is bf16 on every GPU that trains 8B models
    sharded = lambda stage: t.workers if t.zero_stage >= stage else 1  # noqa: E731
    trainable = n if t.finetune == "full" else n * LORA_TRAINABLE
    states = n * width / sharded(3) + trainable * width / sharded(2) + trainable * 12 / sharded(1)
    return states / 1e9 + micro_batch_gb(p, t, shape)


def group_memory_gb(p: float, t, k: int, per_forward: int, shape: tuple | None = None) -> float:
    """Rough peak memory of a worker training k LoRA adapters together (runner.train.group), their
    micro-batches `per_forward` adapters at a time: one frozen base in the training precision, each
    adapter's fp32 weights, gradients and Adam state, and per_forward micro-batches' activations."""
    n = p * 1e9
    width = 2 if t.bf16 in (True, "auto") else 4
    cpu = t.gpus_per_worker == 0
    return ((PROCESS_GB_CPU if cpu else 0.0) + (n * width + k * n * LORA_TRAINABLE * 16) / 1e9
            + per_forward * micro_batch_gb(p, t, shape, cpu))


def adapters_per_group(p: float, t, budget_gb: float, cells: int,
                       shape: tuple | None = None) -> tuple[int, int]:
    """(adapters in a group, adapters per forward): the spec's train.adapters_per_group or ("auto")
    every cell, and on GPUs as many micro-batches in one forward as `budget_gb` per worker holds (on
    CPUs one); (1, 1) (each cell alone) for full fine-tuning and ZeRO-3."""
    if t.finetune != "lora" or t.zero_stage == 3:
        return 1, 1
    k = cells if t.adapters_per_group == "auto" else min(cells, t.adapters_per_group)
    per = 1
    # On CPUs one adapter per forward: 3 per forward took the same optimizer-step time and 2.15× the
    # memory (bench/multi_adapter.py, docs/BENCHMARKS.md); GPUs fill better with larger batches.
    while t.gpus_per_worker > 0 and per < k and group_memory_gb(p, t, per + 1, per + 1, shape) <= budget_gb:
        per += 1
    while k > per and group_memory_gb(p, t, k, per, shape) > budget_gb:
        k -= 1  # adapter states alone rarely bind
    return k, per


# Of a worker's memory, the share training plans on: estimate, headroom for the allocator and CUDA context.
MEMORY_SHARE = 0.8


def worker_budget_gb(t, gpu_gb: float, resources: dict) -> float:
    """Memory a training worker may plan on: MEMORY_SHARE of its GPUs' memory, or on CPUs of its share
    of the cluster's memory (`resources`: ray.cluster_resources()), one worker per t.cpus_per_worker CPUs."""
    if t.gpus_per_worker > 0:
        return MEMORY_SHARE * gpu_gb * t.gpus_per_worker
    return MEMORY_SHARE * resources.get("memory", 0) / 1e9 * t.cpus_per_worker / max(1.0, resources.get("CPU", 1))


def group_layout(p: float, t, budget_gb: float, cells: int, share: int,
                 shape: tuple | None = None) -> tuple[int, int]:
    """(groups, adapters per forward) for one base model's cells: groups of at most
    `adapters_per_group`, but no fewer than the `share` of worker groups the cluster runs at once
    (a group step costs about the sum of its adapters')."""
    k, per = adapters_per_group(p, t, budget_gb, cells, shape)
    return max(math.ceil(cells / k), min(cells, share)), per


def layout_problem(model: str, p: float, t, gpu_gb: float, cells: int, shape: tuple | None = None) -> str | None:
    """Why a GPU training worker cannot hold the smallest layout of `model`'s cells (None: it can, or
    the workers are CPUs, whose memory is the node's): a cell alone (train.adapters_per_group 1, full
    fine-tuning, ZeRO-3, a lone cell), else a group of one adapter, one micro-batch per forward."""
    if t.gpus_per_worker <= 0:
        return None
    have = gpu_gb * t.gpus_per_worker
    alone = t.finetune != "lora" or t.zero_stage == 3 or t.adapters_per_group == 1 or cells == 1
    need = train_memory_gb(p, t, shape) if alone else group_memory_gb(p, t, 1, 1, shape)
    if need <= have:
        return None
    how = ("each cell alone under DeepSpeed (train.adapters_per_group: 1)" if alone else
           f"a group of a single LoRA adapter (train.adapters_per_group: {t.adapters_per_group})")
    return (f"train: {model} needs about {need:.0f} GB per worker as {how} ({p:g}B, micro_batch_size "
            f"{t.micro_batch_size} × 2 × {t.max_length} tokens) and a worker has {have:g} GB "
            "(cluster.gpu_memory_gb × train.gpus_per_worker): set train.gradient_checkpointing: true, "
            "or lower train.micro_batch_size or train.max_length")
