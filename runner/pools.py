"""Engine-pool lifecycle: one pool per served model, shared by the stages that need it, closed
before training (which needs every core and GPU) and when the study ends."""
from __future__ import annotations

import time
from typing import Any

from runner.capacity import capacity, fit_actors
from runner.progress import say

LEASE_RETURN_S = 2.0  # how long a pool start waits for CPUs that finished tasks are handing back
# Output tokens past which a CPU engine is compiled (engine.cpu_compile: null). Measured on 2 cores
# (SmolLM2-135M, fp32): compiled decoding saves about 1.2 ms a token and costs 20 s more at start
# (90 s with a cold compile cache), so it pays from about 17k tokens warm and 76k cold.
CPU_COMPILE_MIN_TOKENS = 50_000


class Pools:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self._open: dict[tuple[str, str | None, bool], object] = {}  # (model path, full-model path, lora)
        self.opened: list = []  # every pool started, in order (valind rehearse reports the hand-overs)

    def config(self, model: str, enable_lora: bool = False, path: str | None = None, tokens: int = 0,
               scores: bool = False):
        """`tokens`: the output tokens the caller will ask of the pool (for `engine.cpu_compile`);
        `scores` with `enable_lora`: an engine that scores with adapters, so one that merges them."""
        from runner.engines import EngineConfig  # deferred: runner.engines imports ray (~0.5 s)
        ctx = self.ctx
        e, m = ctx.engine_spec(model), ctx.spec.model(model)
        compiled = e.cpu_compile if e.cpu_compile is not None else tokens >= CPU_COMPILE_MIN_TOKENS
        return EngineConfig(model=path or ctx.model_path(model), backend=e.backend, dtype=e.dtype,
                            max_model_len=e.max_model_len, enable_lora=enable_lora,
                            max_lora_rank=ctx.spec.train.lora.r, max_loras=4, tensor_parallel=e.tensor_parallel,
                            kv_cache_gb=e.kv_cache_gb, gpu_memory_utilization=e.gpu_memory_utilization,
                            gpu_kv_cache_gb=e.gpu_kv_cache_gb, feeding=e.feeding,
                            chat_template=ctx.chat_template(model),
                            trust_remote_code=m.trust_remote_code, cpu_compile=compiled,
                            lora_mode="merge" if enable_lora and scores else "auto")

    def find(self, model: str, enable_lora: bool = False, path: str | None = None, scores: bool = False):
        """The open pool that serves these requests, or None. A LoRA pool also serves base-model
        generation, and log-prob scoring (`scores`) where its engine can (merged adapters on CPUs;
        vLLM's LoRA path cannot score)."""
        mp = self.ctx.model_path(model)
        plain, lora = self._open.get((mp, path, False)), self._open.get((mp, path, True))
        if plain is not None and not enable_lora:
            return plain
        if lora is not None and (not scores or lora.lora_scores):
            return lora
        return None

    def get(self, model: str, enable_lora: bool = False, path: str | None = None, scores: bool = False,
            share: int = 1, tokens: int = 0):
        """An engine pool for a model (`path`: a fully fine-tuned copy of it): the open one that serves
        these requests (`find`), else a new one. `share`: how many pools the caller opens to use
        together (they split the free CPUs); `tokens`: see `config`."""
        from runner.engines import EnginePool  # deferred: runner.engines imports ray (~0.5 s)
        if (pool := self.find(model, enable_lora, path, scores)) is not None:
            return pool
        mp = self.ctx.model_path(model)
        if (old := self._open.pop((mp, path, enable_lora), None)) is not None:
            old.close()  # a LoRA pool that cannot score (vLLM's LoRA path): one that merges takes its place
        self.ctx.ensure_ray()
        e = self.ctx.engine_spec(model)
        # no more actors than the cluster (or its autoscaler) can ever hold: the others would wait
        # engine.startup_timeout_s for nothing
        actors = fit_actors(path or model, e.actors, e.cpus_per_actor or 1, e.gpus_per_actor, self.ctx.spec.cluster)
        cpus = e.cpus_per_actor or cpus_per_actor(actors, e.gpus_per_actor, share, self._held_cpus())
        self._make_room({"CPU": cpus * actors, "GPU": e.gpus_per_actor * actors})
        cfg = self.config(model, enable_lora, path, tokens, scores)
        compiled = cfg.cpu_compile and cfg.resolved_backend() == "vllm"
        pool = EnginePool(cfg, actors=actors, gpus_per_actor=e.gpus_per_actor,
                          cpus_per_actor=cpus, batch_size=e.batch_size, startup_timeout_s=e.startup_timeout_s,
                          call_timeout_s=e.call_timeout_s)
        say(f"  engine pool for {path or model}{' (LoRA)' if enable_lora else ''}: {pool.size} actor(s) of "
            f"{cpus} CPU{f' and {e.gpus_per_actor:g} GPU' if e.gpus_per_actor else ' (torch.compile)' if compiled else ''}, started in {pool.startup_s:.0f}s"
            + (f", threads on cores {pool.cores}" if any(pool.cores) else ""))
        self._open[(mp, path, enable_lora)] = pool
        self.opened.append(pool)
        return pool

    def _held_cpus(self) -> float:
        return sum(p.cpus * len(p.actors) for p in self._open.values())

    def _make_room(self, need: dict[str, float]) -> None:
        """Close open pools, oldest first, until `need` (CPUs and GPUs) is free: a stage that starts a
        pool is done with the pools before it, except those it opens together (which `share` sizes to
        fit). GPUs an autoscaler can still add (the spec's cluster: beside those the open pools hold)
        close nothing: judges opened together on a cluster still growing keep each other."""
        most = capacity(self.ctx.spec.cluster)["GPU"]
        while self._open:
            free = free_resources(need)
            held = sum(p.gpus * len(p.actors) for p in self._open.values())
            gpus = need.get("GPU", 0)
            if free.get("CPU", 0) >= need.get("CPU", 0) - 1e-9 and (free.get("GPU", 0) >= gpus - 1e-9
                                                                    or most - held >= gpus - 1e-9):
                return
            model, pool = next(iter(self._open.items()))
            say(f"  closing the engine pool for {model[1] or model[0]} to free its {pool.cpus:g} CPU(s)"
                f"{f' and {pool.gpus:g} GPU(s)' if pool.gpus else ''} per actor")
            self._open.pop(model).close()

    def close(self, keep=()) -> None:
        """Close the open pools, except those in `keep`."""
        for k in [k for k, p in self._open.items() if p not in keep]:
            self._open.pop(k).close()


def cpus_per_actor(actors: int, gpus_per_actor: float, share: int = 1, reclaimable: float = 0.0) -> int:
    """Beside a GPU an actor needs one CPU. On CPUs the engines do the compute: the actors (of the
    `share` pools opened together) split the free CPUs (and those of open pools that can be
    closed for them), at most one node's worth each."""
    import ray  # deferred: ray takes ~0.5 s to import, and only a started pool needs it
    if gpus_per_actor:
        return 1
    node = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    want = min(node * actors, ray.cluster_resources().get("CPU", 0))
    free = free_cpus(want - reclaimable) + reclaimable
    return max(1, int(min(node, free / actors) // share))


def free_cpus(at_least: float) -> float:
    return free_resources({"CPU": at_least}).get("CPU", 0)


def free_resources(need: dict[str, float]) -> dict[str, float]:
    """The cluster's free resources, read again for up to LEASE_RETURN_S while `need` does not fit: a
    task that just finished returns its CPUs a moment before the cluster's view shows them (read at
    once, a pool started right after one got half the node, measured in the demo)."""
    import ray  # deferred: ray takes ~0.5 s to import, and only a started pool needs it
    deadline = time.monotonic() + LEASE_RETURN_S
    while not _fits(need, free := ray.available_resources()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return free


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0) >= v - 1e-9 for k, v in need.items() if v)
