"""Engine-pool lifecycle: one pool per served model, shared by the stages that need it, closed
before training (which needs every core and GPU) and when the study ends."""
from __future__ import annotations

from runner.progress import say


class Pools:
    def __init__(self, ctx):
        self.ctx = ctx
        self._open: dict[tuple[str, str | None, bool], object] = {}  # (model path, full-model path, lora)
        self.opened: list = []  # every pool started, in order (valind rehearse reports the hand-overs)

    def config(self, model: str, enable_lora: bool = False, path: str | None = None):
        from runner.engines import EngineConfig
        ctx = self.ctx
        e, m = ctx.engine_spec(model), ctx.spec.model(model)
        return EngineConfig(model=path or ctx.model_path(model), backend=e.backend, dtype=e.dtype,
                            max_model_len=e.max_model_len, enable_lora=enable_lora,
                            max_lora_rank=ctx.spec.train.lora.r, max_loras=4, tensor_parallel=e.tensor_parallel,
                            kv_cache_gb=e.kv_cache_gb, gpu_memory_utilization=e.gpu_memory_utilization,
                            chat_template=ctx.chat_template(model),
                            trust_remote_code=m.trust_remote_code)

    def get(self, model: str, enable_lora: bool = False, path: str | None = None, scores: bool = False):
        """An engine pool for a model (`path`: a fully fine-tuned copy of it).

        A LoRA pool also serves base-model generation, but not log-prob scoring (`scores`),
        which vLLM cannot do with LoRA enabled: that gets a pool of its own.
        """
        from runner.engines import EnginePool
        mp = self.ctx.model_path(model)
        if not enable_lora and (mp, path, False) in self._open:
            return self._open[(mp, path, False)]
        if (mp, path, True) in self._open and not scores:
            return self._open[(mp, path, True)]
        self.ctx.ensure_ray()
        e = self.ctx.engine_spec(model)
        say(f"  starting {e.actors} engine actor(s) for {path or model}{' (LoRA)' if enable_lora else ''}")
        pool = EnginePool(self.config(model, enable_lora, path), actors=e.actors, gpus_per_actor=e.gpus_per_actor,
                          batch_size=e.batch_size, startup_timeout_s=e.startup_timeout_s)
        self._open[(mp, path, enable_lora)] = pool
        self.opened.append(pool)
        return pool

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
