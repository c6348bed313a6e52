"""LoRA generation on CPU: the ways to evaluate K adapters of one base model, timed side by side.

The demo's generate stage is K trained adapters × the same items. Options, each timed from
engine start to the last output (start-up included: it is part of what a stage pays):
  (1) one vLLM engine with vLLM's LoRA path, every adapter's requests in one call, max_loras 4
      (the CPU default before);
  (2) the same with max_loras K (every adapter resident, no swapping; only if K > 4);
  (3) each adapter merged into the base (peft merge_and_unload), one plain vLLM engine per adapter;
  (4) transformers + peft, adapters unmerged, batched per adapter (our TransformersEngine);
  (5) one plain vLLM engine that merges each adapter into the weights it touches in turn
      (runner.engines.merge; what VLLMEngine does on CPU now).
Outputs are compared with (4), the unmerged reference, greedy; fp32 by default so that equal
arithmetic gives equal text (bf16 kernels of different engines round differently).

    .venv/bin/python bench/lora_generate.py [--adapters 4] [--prompts 48] [--max-tokens 40] [--dtype float32]
                                            [--study studies/demo]   # its trained adapters and items
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from generate_throughput import count_tokens, first_turns, make_adapters, matches  # noqa: E402

CORES = len(os.sched_getaffinity(0))


def requests(chats, max_tokens: int, adapter: str | None = None):
    from evaluation.types import Request
    return [Request(messages=c, adapter=adapter, max_tokens=max_tokens) for c in chats]


def study_inputs(root: Path, k: int):
    """A finished study's first k trained adapters and its evaluation items (the demo's, say)."""
    import pandas as pd
    adapters = sorted(str(p) for p in root.glob("stages/train/*/model"))[:k]
    items = pd.read_parquet(next(root.glob("stages/items/*/items.parquet")))
    chats = [tuple({"role": m["role"], "content": m["content"]} for m in msgs) for msgs in items["messages"]]
    if len(adapters) < k:
        raise SystemExit(f"{root}: {len(adapters)} trained adapters, fewer than --adapters {k}")
    return adapters, chats


def vllm_lora(model_dir, dtype, adapters, chats, max_tokens, cpus, max_loras, mode="multiplex"):
    from runner.engines import EngineConfig, EnginePool
    cfg = EngineConfig(model=model_dir, backend="vllm", dtype=dtype, max_model_len=1024, enable_lora=True,
                       max_loras=max_loras, max_lora_rank=8, lora_mode=mode)
    reqs = [r for a in adapters for r in requests(chats, max_tokens, a)]
    t = time.perf_counter()
    with EnginePool(cfg, actors=1, cpus_per_actor=cpus, batch_size=len(reqs)) as pool:
        out = pool.generate(reqs)
    return time.perf_counter() - t, out


def merged(model_dir, dtype, adapters, chats, max_tokens, work: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.engines import EngineConfig, EnginePool
    t, out = time.perf_counter(), []
    for i, a in enumerate(adapters):
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), a)
        path = work / f"merged{i}"
        m.merge_and_unload().save_pretrained(path)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
        cfg = EngineConfig(model=str(path), backend="vllm", dtype=dtype, max_model_len=1024)
        with EnginePool(cfg, actors=1, cpus_per_actor=CORES, batch_size=len(chats)) as pool:
            out += pool.generate(requests(chats, max_tokens))
    return time.perf_counter() - t, out


def transformers_peft(model_dir, dtype, adapters, chats, max_tokens):
    import torch

    from runner.engines import EngineConfig
    from runner.engines.hf_engine import TransformersEngine
    torch.set_num_threads(CORES)
    t = time.perf_counter()
    eng = TransformersEngine(EngineConfig(model=model_dir, backend="transformers", dtype=dtype), batch_size=16)
    out = eng.generate([r for a in adapters for r in requests(chats, max_tokens, a)])
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--study", type=Path, help="a finished study dir: its trained adapters and items instead")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from runner.cluster import init_ray
    from runner.models import prepare_smollm2

    model_dir = str(prepare_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    k = args.adapters
    if args.study:
        adapters, chats = study_inputs(args.study, k)
        what = f"{k} adapters trained by {args.study} × its {len(chats)} evaluation items"
    else:
        chats = [({"role": "user", "content": t},) for t in first_turns(args.prompts)]
        what = f"{k} random adapters (r=8, q/k/v/o) × {len(chats)} HH harmless-base first turns"
    init_ray(num_cpus=CORES)
    n = k * len(chats)
    print("=" * 100)
    print(f"LoRA generation: SmolLM2-135M-Instruct {args.dtype}, {what} = {n} requests, greedy, max "
          f"{args.max_tokens} new tokens, {CORES} cores; load average at start {os.getloadavg()[0]:.2f}")
    print("=" * 100, flush=True)
    with tempfile.TemporaryDirectory(prefix="valind-lora-") as d:
        if not args.study:
            adapters = make_adapters(model_dir, k, Path(d))
        ref_s, ref = transformers_peft(model_dir, args.dtype, adapters, chats, args.max_tokens)
        options = {
            f"(1) vLLM LoRA path, {CORES} CPUs, max_loras 4 (before)": vllm_lora(
                model_dir, args.dtype, adapters, chats, args.max_tokens, CORES, 4),
            **({f"(2) vLLM LoRA path, {CORES} CPUs, max_loras {k}": vllm_lora(
                model_dir, args.dtype, adapters, chats, args.max_tokens, CORES, k)} if k > 4 else {}),
            f"(3) merged adapters, one vLLM engine each, {CORES} CPUs": merged(
                model_dir, args.dtype, adapters, chats, args.max_tokens, Path(d)),
            "(4) transformers + peft, unmerged, batch 16 (reference)": (ref_s, ref),
            f"(5) one vLLM engine, adapters merged in turn, {CORES} CPUs (now)": vllm_lora(
                model_dir, args.dtype, adapters, chats, args.max_tokens, CORES, 4, mode="merge"),
        }
    before = options[next(iter(options))][0]
    for name, (s, out) in options.items():
        same = matches(out, ref)
        print(f"{name:<62} {s:7.1f} s  {count_tokens(tok, out) / s:6.1f} tok/s  x{before / s:4.2f} vs (1)  "
              f"identical to (4): {same}/{n}")
    best = min(options, key=lambda x: options[x][0])
    print("-" * 100)
    print(f"RESULT lora_generate fastest={best!r} ratio_vs_before={before / options[best][0]:.2f}")
    import ray
    ray.shutdown()


if __name__ == "__main__":
    main()
