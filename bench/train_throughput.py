"""Training throughput: our DPO optimizer step vs TRL's DPOTrainer, same model, data, LoRA and batch.

Ours is `runner.train.loop.optimizer_step` (what every Ray Train worker runs per step) on a
DeepSpeed ZeRO-2 engine built with `loop.ds_config`, world size 1, reference log-probs precomputed
as `runner.train.launch` does. TRL is `DPOTrainer(precompute_ref_log_probs=True)` at its best CPU
settings: no DDP wrapper (world size 1, asserted), sdpa attention (asserted), its fused LM head, no
logging or saving, 0 dataloader workers.

Each side runs in a fresh process of its own (this script re-invoked with `--side`), with no
distributed variables in its environment, so neither inherits the other's torch.distributed state,
threads or allocator. Each round runs TRL first, then ours; `--rounds N` alternates N times and pools
the timed steps. Both sides: same precision (fp32; `--bf16` puts both in bf16), 2 threads. Each side
reports per-step times after warm-up; tokens are the real (non-pad) tokens of the chosen+rejected
sequences of a step.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--warmup 2] [--rounds 1] [--bf16] [--skip-trl]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH, MAX_LEN, THREADS, BETA, LR = 4, 256, 2, 0.1, 5e-5
DIST_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def gemm_peak(n: int = 2048, reps: int = 5, per: int = 10, dtype=torch.float32) -> float:
    """Best-of-reps GFLOP/s of n³ matmuls: the machine's practical peak for the MFU denominator."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(per):
            a @ b
        best = max(best, 2 * n ** 3 * per / (time.perf_counter() - t) / 1e9)
    return best


def load_data(n_pairs: int):
    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec

    data_dir = Path(os.environ.get("VALIND_DATA_DIR") or ROOT.parent / "shared" / "data")
    pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test", max_pairs=n_pairs),
                          data_dir, max_chars=4000)
    return pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_dist() -> None:
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed("gloo")


def bench_ours(model_dir: str, tok, pairs, steps: int, warmup: int, bf16: bool) -> dict:
    import deepspeed

    from runner.spec import LoraSpec, TrainSpec
    from runner.train.batches import encode_pairs
    from runner.train.cell import Cell
    from runner.train.launch import compute_reference_logps
    from runner.train.loop import build_model, ds_config, optimizer_step
    from runner.train.losses import make_loss

    examples = encode_pairs(tok, pairs, MAX_LEN)[: BATCH * (steps + warmup)]
    t = time.perf_counter()
    refs = compute_reference_logps(model_dir, examples, BATCH, THREADS, False, bf16=bf16)
    for e, (c, r) in zip(examples, refs):
        e.ref_chosen, e.ref_rejected = c, r
    ref_s = time.perf_counter() - t

    init_dist()
    train = TrainSpec(method="dpo", finetune="lora", lora=LoraSpec(**LORA), beta=BETA, lr=LR, bf16=bf16,
                      batch_size=BATCH, micro_batch_size=BATCH, workers=1, zero_stage=2, max_length=MAX_LEN)
    # only model_path and train matter to build_model; the rest of the cell is never read here
    cell = Cell(cell_id="bench", seed=0, train=train, pairs="", model_path=model_dir, model_id="bench",
                out_dir="", work_dir="", ref_cache="")
    loss_fn = make_loss(train)
    torch.manual_seed(0)
    model = build_model(cell)
    n_params = sum(p.numel() for p in model.parameters())
    attn = model.config._attn_implementation
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(train, 1))
    engine.train()
    torch.set_num_threads(THREADS)  # compute_reference_logps sets it too; make sure nothing changed it
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    times, tokens, losses = [], [], []
    for s in range(steps + warmup):
        t = time.perf_counter()
        sums = optimizer_step(engine, [examples[s * BATCH:(s + 1) * BATCH]], loss_fn, pad, engine.device)
        dt = time.perf_counter() - t
        losses.append(sums[0].item() / sums[6].item())
        if s >= warmup:
            times.append(dt)
            tokens.append(sums[5].item())
    out = {"times": times, "tokens": tokens, "losses": losses, "ref_s": ref_s, "n_params": n_params,
           "wrapper": type(engine).__name__, "attn": attn, "threads": torch.get_num_threads()}
    del engine, model, optimizer
    gc.collect()
    return out


def bench_trl(model_dir: str, tok, pairs, steps: int, warmup: int, bf16: bool) -> dict:
    from accelerate.utils import DistributedType
    from datasets import Dataset
    from peft import LoraConfig
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    n = BATCH * (steps + warmup)
    rows = [{"prompt": list(r.prompt), "chosen": [{"role": "assistant", "content": r.chosen}],
             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in pairs.itertuples()]
    ds = Dataset.from_list(rows)
    tokens: list[int] = []
    ends: list[float] = []
    seen: dict = {}

    class Trainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super()._compute_loss(model, inputs, return_outputs)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not ends:  # start of step 1: after ref precompute, set-up and accelerator.prepare
                seen.update(wrapper=type(trainer.model_wrapped).__name__, threads=torch.get_num_threads(),
                            ddp=isinstance(trainer.model_wrapped, DistributedDataParallel),
                            dist_type=str(trainer.accelerator.distributed_type),
                            dist_init=torch.distributed.is_available() and torch.distributed.is_initialized())
                ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    attn = model.config._attn_implementation
    if attn != "sdpa":
        raise RuntimeError(f"TRL model loaded with attn_implementation={attn!r}, wanted 'sdpa'")
    # No gradient checkpointing (TRL's default): ours does not checkpoint either, so it would not be the same work.
    args = DPOConfig(output_dir=str(Path(tempfile.gettempdir()) / "valind-trl-bench"),
                     per_device_train_batch_size=BATCH, max_length=MAX_LEN, max_steps=steps + warmup,
                     precompute_ref_log_probs=True, use_cpu=True, bf16=bf16, fp16=False,
                     gradient_checkpointing=False, learning_rate=LR, beta=BETA, report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                     dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = Trainer(model=model, processing_class=tok, train_dataset=ds, peft_config=lora, args=args,
                      callbacks=[Clock()])
    kept = len(trainer.train_dataset)
    torch.set_num_threads(THREADS)  # after set-up, which may change it
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    # The unfair setting this benchmark used to have: a DDP wrapper (find_unused_parameters) at world size 1.
    if seen["ddp"] or seen["dist_type"] != str(DistributedType.NO) or seen["dist_init"]:
        raise RuntimeError(f"TRL is not running single-process without DDP: {seen}")
    step_times = [b - a for a, b in zip(ends, ends[1:])]
    # a step may run _compute_loss once (no eval); tokens[i] belongs to step i
    out = {"times": step_times[warmup:], "tokens": tokens[warmup:steps + warmup], "kept": kept, "total_s": total,
           "n_rows": n, "attn": attn, **seen}
    del trainer, model
    gc.collect()
    return out


def run_side(side: str, model_dir: str, steps: int, warmup: int, bf16: bool, out: str) -> None:
    """Child process: one side's benchmark, its result as JSON in `out`."""
    torch.set_num_threads(THREADS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # TRL drops pairs whose prompt alone fills max_length; load spare pairs so both sides get full steps.
    pairs = load_data(BATCH * (steps + warmup) + 16)
    fn = bench_ours if side == "ours" else bench_trl
    r = fn(model_dir, tok, pairs, steps, warmup, bf16)
    r["n_pairs"] = len(pairs)
    Path(out).write_text(json.dumps(r))


def spawn(side: str, model_dir: str, args) -> dict:
    """Run one side in a fresh interpreter with no distributed variables; return its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("ACCELERATE_")}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), *(["--bf16"] if args.bf16 else [])]
        # child output goes to our stderr: stdout stays the report
        rc = subprocess.run(cmd, env=env, stdout=sys.stderr).returncode
        if rc != 0 or not out.exists():
            raise SystemExit(f"{side} benchmark process failed (exit {rc})")
        return json.loads(out.read_text())


def spread(times: list[float]) -> str:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return (f"median={statistics.median(times):.2f} min={min(times):.2f} max={max(times):.2f} "
            f"iqr={q3 - q1:.2f} ({q1:.2f}..{q3:.2f})")


def summarise(name: str, r: dict) -> float:
    med_t = statistics.median(r["times"])
    tok_step = statistics.median(r["tokens"])
    rate = statistics.median([k / t for k, t in zip(r["tokens"], r["times"])])
    print(f"  {name:<34} s/step median {med_t:6.2f}  [{', '.join(f'{t:.2f}' for t in r['times'])}]  "
          f"real tokens/step median {tok_step:.0f}  tokens/s {rate:7.1f}")
    return rate


def pool(runs: list[dict]) -> dict:
    """Rounds' results as one: timed steps and tokens concatenated, the rest from the first round."""
    return {**runs[0], "times": [t for r in runs for t in r["times"]], "tokens": [k for r in runs for k in r["tokens"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side per round (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="TRL-then-ours rounds, each side a fresh process")
    ap.add_argument("--bf16", action="store_true", help="both sides in bf16 (default fp32)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return run_side(args.side, args.model_dir, args.steps, args.warmup, args.bf16, args.out)

    torch.set_num_threads(THREADS)
    from runner.models import prepare_smollm2

    model_dir = str(prepare_smollm2())
    prec = "bf16" if args.bf16 else "fp32"
    print("=" * 100)
    print("DPO training throughput: OURS (runner.train.loop.optimizer_step, DeepSpeed ZeRO-2, ws=1)")
    print("                     vs TRL DPOTrainer (precompute_ref_log_probs=True, no DDP, sdpa)")
    print(f"SmolLM2-135M-Instruct, HH-RLHF harmless-base test pairs, LoRA r={LORA['r']} alpha={LORA['alpha']} "
          f"q/k/v/o, {BATCH} pairs/step, max_length {MAX_LEN}, {prec} both sides, {THREADS} threads, "
          f"{args.rounds} round(s) of [TRL, ours] in fresh processes, each {args.warmup} warm-up + {args.steps} "
          f"timed steps; TRL: gradient_checkpointing=False, no logging/saving, 0 dataloader workers")
    print("tokens = real (non-pad) tokens of chosen+rejected sequences per step; reference passes precomputed "
          "(not timed)")
    print(f"load average at start (other processes on this machine skew timings): {os.getloadavg()[0]:.2f}")
    print("=" * 100, flush=True)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = gemm_peak(dtype=dtype)
    print(f"GEMM peak (2048^3 {prec}, {THREADS} threads, best of 5x10): {peak:.1f} GFLOP/s", flush=True)

    ours_runs, trl_runs = [], []
    for _ in range(args.rounds):
        if not args.skip_trl:
            trl_runs.append(spawn("trl", model_dir, args))
        ours_runs.append(spawn("ours", model_dir, args))
    ours = pool(ours_runs)
    trl = pool(trl_runs) if trl_runs else None

    print("-" * 100)
    print(f"  ours: wrapper {ours['wrapper']}, attn_implementation {ours['attn']}, threads {ours['threads']}; "
          f"reference precompute {ours['ref_s']:.1f} s; loss {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f}")
    if trl:
        print(f"  TRL:  wrapper {trl['wrapper']} (DDP: {trl['ddp']}, {trl['dist_type']}), attn_implementation "
              f"{trl['attn']}, threads {trl['threads']}; kept {trl['kept']} of {trl['n_pairs']} pairs; "
              f"train() {trl['total_s']:.1f} s")
    r_ours = summarise(f"ours ({prec})", ours)
    n, t_step, tok_step = ours["n_params"], statistics.median(ours["times"]), statistics.median(ours["tokens"])
    flops = 4 * n * tok_step
    achieved = flops / t_step / 1e9
    print(f"  MFU ours: 4*N*T = 4*{n:,}*{tok_step:.0f} = {flops / 1e12:.3f} TFLOP in {t_step:.2f} s = "
          f"{achieved:.1f} GFLOP/s = {100 * achieved / peak:.1f}% of the {prec} GEMM peak")
    r_trl = summarise(f"TRL DPOTrainer ({prec})", trl) if trl else None
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("-" * 100)
    if r_trl:
        print(f"RESULT train_tokens_per_s ours={r_ours:.1f} trl={r_trl:.1f} ratio={r_ours / r_trl:.2f} "
              f"(target >= 1.3) mfu={100 * achieved / peak:.1f}%")
    else:
        print(f"RESULT train_tokens_per_s ours={r_ours:.1f} mfu={100 * achieved / peak:.1f}%")
    print(f"SPREAD step_s ours {spread(ours['times'])}"
          + (f" | trl {spread(trl['times'])}" if trl else "") + f" ({prec}, after warm-up)")


if __name__ == "__main__":
    main()
