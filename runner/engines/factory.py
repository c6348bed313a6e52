"""The engine a config's backend names: above the engine modules, which build on runner.engines.base."""
from __future__ import annotations

from runner.engines.base import EngineConfig


def make_engine(cfg: EngineConfig):
    backend = cfg.resolved_backend()
    if backend == "vllm":
        from runner.engines.vllm_engine import VLLMEngine  # deferred: torch and vLLM, for the chosen backend only
        return VLLMEngine(cfg)
    if backend == "transformers":
        from runner.engines.hf_engine import TransformersEngine  # deferred: torch and transformers, likewise
        return TransformersEngine(cfg)
    raise ValueError(f"unknown engine backend {backend!r}")
