"""Engine configuration and the shared prompt rendering (chat template → token ids)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.errors import ValindError
from evaluation.types import Request, ScoreRequest


@dataclass(frozen=True)
class EngineConfig:
    model: str                      # resolved local dir or hub id
    backend: str = "auto"           # auto | vllm | transformers
    dtype: str = "float32"
    max_model_len: int = 1024
    enable_lora: bool = False
    max_lora_rank: int = 8
    max_loras: int = 4
    # auto: adapters merged into the weights one at a time on CPU, vLLM's LoRA kernels on GPU
    # (not a spec setting: the engine chooses; benchmarks compare the two)
    lora_mode: str = "auto"
    tensor_parallel: int = 1
    kv_cache_gb: float | None = None     # vLLM-CPU's KV cache; None: 1 GB. GPUs do not read it
    gpu_kv_cache_gb: float | None = None  # a cap on a GPU engine's KV cache; None: what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9
    # vLLM-CPU: torch.compile (inductor) instead of eager; GPUs always compile (CUDA graphs)
    cpu_compile: bool = False
    seed: int = 0
    chat_template: str | None = None
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)
    # how a pool feeds generation to engines that take requests one by one (vLLM): "continuous"
    # (requests streamed, the running batch refilled as sequences finish) or "batches" (one call per
    # batch_size requests, each run to its longest sequence: the path before issue 34)
    feeding: str = "continuous"

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


class AdapterError(ValindError, ValueError):
    """A LoRA adapter directory that an engine could not load; the message names the directory."""


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(path) -> Path:
    """Fail before any engine starts when `path` is not a complete PEFT adapter directory."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"{p}: LoRA adapter directory not found")
    missing = [] if (p / "adapter_config.json").is_file() else ["adapter_config.json"]
    if not any((p / w).is_file() for w in ADAPTER_WEIGHTS):
        missing.append(" or ".join(ADAPTER_WEIGHTS))
    if missing:
        raise AdapterError(f"{p}: not a complete LoRA adapter directory (missing {', '.join(missing)})")
    return p


def render_prompt_ids(tokenizer, messages, chat_template: str | None = None) -> list[int]:
    """Token ids of a chat with the generation prompt appended: identical for every backend."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                        chat_template=chat_template, return_dict=False)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def truncate_left(ids: list[int], room: int) -> list[int]:
    """Keep the end of an over-long prompt (the question is at the end of a dialogue)."""
    return ids[-room:] if len(ids) > room else ids


__all__ = ["AdapterError", "EngineConfig", "check_adapter", "Request", "ScoreRequest", "render_prompt_ids", "truncate_left"]
