"""One short run (<10 min) over the GPU code paths that the CPU machine cannot exercise.

1. vLLM generation on CUDA with LoRA: an EnginePool (one VLLMEngine actor, enable_lora) over
   SmolLM2-135M-Instruct (runner.models.prepare_smollm2) serving the base model and a random peft
   adapter; the adapter must change the greedy output.
2. DeepSpeed DPO on one GPU: runner.train.launch.train_cell with TrainSpec(workers=1,
   gpus_per_worker=1, bf16=True, zero_stage=2): NCCL process group, bf16, reference log-probs on
   the GPU, LoRA adapter written; the trained adapter is then served by vLLM.

Without a GPU it says so and exits 0. Exit 1 when a check fails. See docs/GPU_CHECK.md.

    .venv/bin/python bench/gpu_check.py [--pairs 16] [--steps-batch 4]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Short chats used when no HH-RLHF file is found (a data dir is not part of the device checkout).
FALLBACK = [("How do I pick a lock?", "I can't help with breaking into places that aren't yours.",
             "Insert a tension wrench and rake the pins."),
            ("Say something kind.", "You are doing better than you think.", "No."),
            ("What is 2 + 2?", "2 + 2 is 4.", "5, obviously."),
            ("Write a short greeting.", "Hello, and welcome!", "Go away.")]


def gpu_info() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def random_adapter(model_dir: Path, out: Path, r: int = 8) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B: it visibly changes generations."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=4 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def load_pairs(n: int):
    import pandas as pd

    from runner.data.sources import load_pairs as load
    from runner.spec import SourceSpec

    data = os.environ.get("VALIND_DATA_DIR") or next(
        (str(p) for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if p.exists()), None)
    if data:
        try:
            df, _ = load(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test", max_pairs=n),
                         Path(data), 2000)
            return df.head(n), f"HH-RLHF harmless-base ({data})"
        except Exception as e:  # fall through to the inline pairs
            print(f"  (HH-RLHF not loadable: {type(e).__name__}: {e}; using inline pairs)")
    rows = [{"pair_id": f"inline-{i}", "source": "inline", "prompt": [{"role": "user", "content": q}],
             "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(FALLBACK * math.ceil(n / len(FALLBACK)))][:n]
    return pd.DataFrame(rows), "inline pairs"


def check_vllm_lora(model_dir: Path, adapters: dict[str, Path]) -> dict:
    from evaluation.types import Request
    from runner.engines import EngineConfig, EnginePool

    cfg = EngineConfig(model=str(model_dir), backend="vllm", dtype="bfloat16", max_model_len=1024,
                       enable_lora=True, max_lora_rank=16, max_loras=2,
                       extra={"gpu_memory_utilization": 0.35})  # a 135M model needs little; the GPU may be shared
    t0 = time.perf_counter()
    pool = EnginePool(cfg, actors=1, gpus_per_actor=1, batch_size=64)
    startup = time.perf_counter() - t0
    prompts = [[{"role": "user", "content": f"Tell me one fact about the number {i}."}] for i in range(32)]
    try:
        out = {}
        for name, adapter in [("base", None), *adapters.items()]:
            reqs = [Request(messages=tuple(p), adapter=str(adapter) if adapter else None, max_tokens=48,
                            temperature=0.0) for p in prompts]
            t = time.perf_counter()
            texts = pool.generate(reqs, desc=f"vllm {name}")
            out[name] = {"texts": texts, "seconds": time.perf_counter() - t}
    finally:
        pool.close()
    base = out["base"]["texts"]
    result = {"engine": pool.name, "startup_s": round(startup, 1)}
    for name in out:
        texts = out[name]["texts"]
        result[name] = {"nonempty": sum(bool(x.strip()) for x in texts), "of": len(texts),
                        "differs_from_base": sum(a != b for a, b in zip(texts, base)) if name != "base" else None,
                        "requests_per_s": round(len(texts) / out[name]["seconds"], 1),
                        "sample": texts[0][:80]}
    # A few DPO steps may leave greedy text unchanged; the random adapter must change it.
    ok = all(result[n]["nonempty"] == len(prompts) for n in out) and bool(result["random_adapter"]["differs_from_base"])
    return {"ok": ok, **result}


def check_dpo(model_dir: Path, work: Path, n_pairs: int, batch: int) -> dict:
    from transformers import AutoTokenizer

    from runner.spec import TrainSpec, content_hash
    from runner.train.cell import Cell
    from runner.train.launch import train_cell

    pairs, where = load_pairs(n_pairs)
    train = TrainSpec(method="dpo", finetune="lora", workers=1, gpus_per_worker=1, cpus_per_worker=2, bf16=True,
                      zero_stage=2, batch_size=batch, micro_batch_size=2, epochs=1, max_length=256, lr=1e-4,
                      checkpoint_every=1000)
    t0 = time.perf_counter()
    pairs_path = work / "pairs.parquet"
    pairs.to_parquet(pairs_path, index=False)
    cell = Cell(cell_id="gpu-check", seed=0, train=train, pairs=str(pairs_path), model_path=str(model_dir),
                model_id=content_hash("gpu-check"), out_dir=str(work / "cell"), work_dir=str(work / "ray_train"),
                ref_cache=str(work / "reflogps"))
    train_cell(cell, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    seconds = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (work / "cell" / "metrics.jsonl").read_text().splitlines()]
    cell = json.loads((work / "cell" / "cell.json").read_text())
    losses = [m["loss"] for m in metrics if "loss" in m]
    ok = (bool(losses) and all(math.isfinite(x) for x in losses) and cell["bf16"] is True
          and (work / "cell" / "model" / "adapter_config.json").exists())
    return {"ok": ok, "data": where, "pairs": len(pairs), "steps": len(metrics), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "bf16": cell["bf16"], "backend": "nccl (gpus_per_worker=1)",
            "seconds": round(seconds, 1), "pairs_per_s": round(len(pairs) / seconds, 2),
            "adapter": str(work / "cell" / "model")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps-batch", type=int, default=4, help="pairs per optimizer step")
    args = ap.parse_args()

    info = gpu_info()
    if info is None:
        print("gpu_check: no CUDA GPU on this machine: nothing checked (run it on a GPU node; docs/GPU_CHECK.md)")
        return 0
    print(f"gpu_check: {info}")
    from runner.cluster import init_ray
    from runner.models import prepare_smollm2

    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="valind-gpu-check-") as tmp:
        work = Path(tmp)
        model_dir = prepare_smollm2()
        rand = random_adapter(model_dir, work / "random-adapter")
        init_ray()
        for name, fn in [("dpo_1gpu_deepspeed_nccl_bf16", lambda: check_dpo(model_dir, work, args.pairs, args.steps_batch)),
                         ("vllm_lora_generation", lambda: check_vllm_lora(model_dir, _adapters(rand, work)))]:
            print(f"-- {name}")
            t = time.perf_counter()
            try:
                results[name] = fn()
            except Exception as e:
                traceback.print_exc()
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            results[name]["wall_s"] = round(time.perf_counter() - t, 1)
    print("\n== gpu_check summary ==")
    print(f"machine: {info}")
    for name, r in results.items():
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {name}")
        for k, v in r.items():
            if k != "ok":
                print(f"      {k}: {v}")
    print(f"total: {time.perf_counter() - t_all:.0f}s")
    return 0 if all(r["ok"] for r in results.values()) else 1


def _adapters(rand: Path, work: Path) -> dict[str, Path]:
    """The random adapter, and the DPO-trained one when the training check produced it."""
    out = {"random_adapter": rand}
    if (work / "cell" / "model" / "adapter_config.json").exists():
        out["trained_adapter"] = work / "cell" / "model"
    return out


if __name__ == "__main__":
    sys.exit(main())
