"""GPU check of continuous feeding (bench/gpu_check.py's `vllm_continuous_feeding`): one vLLM engine
actor on one GPU generates the same mixed-length greedy requests with engine.feeding "batches" (the
path before issue 34) and "continuous"; records both wall times, their ratio and how many outputs
agree (bf16 on a GPU: a request's batch neighbours can round its greedy path apart, so agreement is
recorded, and at least 90% required). bench/continuous_feeding.py is the CPU benchmark."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path


def check_continuous(model_dir: Path, prompts: int = 256, short: int = 16, long: int = 256,
                     batch: int = 64) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"ok": True, "skipped": "vllm is not importable here"}
    from evaluation.types import Request
    from runner.engines import EngineConfig, EnginePool

    reqs = [Request(messages=({"role": "user", "content": f"Tell me about the number {i}."},),
                    max_tokens=long if i % 4 == 0 else short, temperature=0.0) for i in range(prompts)]
    out: dict = {}
    for feeding in ("batches", "continuous"):
        cfg = EngineConfig(model=str(model_dir), backend="vllm", dtype="bfloat16", max_model_len=1024,
                           feeding=feeding, gpu_memory_utilization=0.35)  # a 135M model; the GPU may be shared
        with EnginePool(cfg, actors=1, gpus_per_actor=1, batch_size=batch) as pool:
            pool.generate(reqs[:8], desc=f"warm-up {feeding}")
            t = time.perf_counter()
            texts = pool.generate(reqs, desc=feeding)
            out[feeding] = {"wall_s": round(time.perf_counter() - t, 2), "texts": texts}
    b, c = out["batches"], out["continuous"]
    same = sum(x == y for x, y in zip(b["texts"], c["texts"]))
    ratio = round(b["wall_s"] / c["wall_s"], 2)
    print(f"vllm_continuous_feeding: batches {b['wall_s']} s, continuous {c['wall_s']} s "
          f"(speed-up {ratio}×), {same}/{prompts} outputs identical")
    return {"ok": same >= 0.9 * prompts and all(t.strip() for t in c["texts"]),
            "batches_s": b["wall_s"], "continuous_s": c["wall_s"], "speedup": ratio,
            "identical": same, "of": prompts, "batch_size": batch}
