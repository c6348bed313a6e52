"""Training throughput: our DPO optimizer step vs TRL's DPOTrainer, same model, data, LoRA and batch.

Ours is `runner.train.loop.optimizer_step` (what every Ray Train worker runs per step) on a
DeepSpeed ZeRO-2 engine built with `loop.ds_config`, in-process with world size 1, reference
log-probs precomputed as `runner.train.launch` does. TRL is `DPOTrainer(precompute_ref_log_probs=True)`.
Both run one after the other in this process, fp32, 2 threads; each reports the median step time
after warm-up, and tokens are the real (non-pad) tokens of the chosen+rejected sequences of a step.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--warmup 2] [--bf16]
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import sys
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
    refs = compute_reference_logps(model_dir, examples, BATCH, THREADS, False)
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(train, 1))
    engine.train()
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
    del engine, model, optimizer
    gc.collect()
    return {"times": times, "tokens": tokens, "losses": losses, "ref_s": ref_s, "n_params": n_params}


def bench_trl(model_dir: str, tok, pairs, steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    n = BATCH * (steps + warmup)
    rows = [{"prompt": list(r.prompt), "chosen": [{"role": "assistant", "content": r.chosen}],
             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in pairs.itertuples()]
    ds = Dataset.from_list(rows)
    tokens: list[int] = []
    ends: list[float] = []

    class Trainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super()._compute_loss(model, inputs, return_outputs)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not ends:
                ends.append(time.perf_counter())  # start of step 1 (after precompute and set-up)

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # fp32 and no gradient checkpointing: TRL's defaults (bf16, checkpointing) would not be the same work as ours.
    args = DPOConfig(output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "valind-trl-bench"),
                     per_device_train_batch_size=BATCH, max_length=MAX_LEN, max_steps=steps + warmup,
                     precompute_ref_log_probs=True, use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=False, learning_rate=LR, beta=BETA, report_to="none",
                     save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, seed=0,
                     dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = Trainer(model=model, processing_class=tok, train_dataset=ds, peft_config=lora, args=args,
                      callbacks=[Clock()])
    kept = len(trainer.train_dataset)
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    torch.set_num_threads(THREADS)  # Trainer may reset it
    step_times = [b - a for a, b in zip(ends, ends[1:])]
    # a step may run _compute_loss once (no eval); tokens[i] belongs to step i
    out = {"times": step_times[warmup:], "tokens": tokens[warmup:steps + warmup], "kept": kept, "total_s": total,
           "n_rows": n}
    del trainer, model
    gc.collect()
    return out


def summarise(name: str, r: dict) -> float:
    med_t = statistics.median(r["times"])
    tok_step = statistics.median(r["tokens"])
    rate = statistics.median([k / t for k, t in zip(r["tokens"], r["times"])])
    print(f"  {name:<34} s/step median {med_t:6.2f}  [{', '.join(f'{t:.2f}' for t in r['times'])}]  "
          f"real tokens/step median {tok_step:.0f}  tokens/s {rate:7.1f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time our step with DeepSpeed bf16")
    ap.add_argument("--skip-trl", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    from transformers import AutoTokenizer

    from runner.models import prepare_smollm2

    model_dir = str(prepare_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    # TRL drops pairs whose prompt alone fills max_length; load spare pairs so both sides get full steps.
    pairs = load_data(BATCH * (args.steps + args.warmup) + 16)
    print("=" * 100)
    print("DPO training throughput: OURS (runner.train.loop.optimizer_step, DeepSpeed ZeRO-2, ws=1)")
    print("                     vs TRL DPOTrainer (precompute_ref_log_probs=True)")
    print(f"SmolLM2-135M-Instruct, HH-RLHF harmless-base test pairs, LoRA r={LORA['r']} alpha={LORA['alpha']} "
          f"q/k/v/o, {BATCH} pairs/step, max_length {MAX_LEN}, fp32, {THREADS} threads, "
          f"{args.warmup} warm-up + {args.steps} timed steps; TRL: bf16=False, gradient_checkpointing=False")
    print("tokens = real (non-pad) tokens of chosen+rejected sequences per step; reference passes precomputed "
          "(not timed)")
    print(f"load average at start (other processes on this machine skew timings): {os.getloadavg()[0]:.2f}")
    print("=" * 100, flush=True)

    peak = gemm_peak()
    print(f"GEMM peak (2048^3 fp32, 2 threads, best of 5x10): {peak:.1f} GFLOP/s", flush=True)

    ours = bench_ours(model_dir, tok, pairs, args.steps, args.warmup, bf16=False)
    print(f"ours: reference precompute {ours['ref_s']:.1f} s; loss {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f}",
          flush=True)
    trl = None if args.skip_trl else bench_trl(model_dir, tok, pairs, args.steps, args.warmup)
    ours_bf16 = bench_ours(model_dir, tok, pairs, args.steps, args.warmup, bf16=True) if args.bf16 else None

    print("-" * 100)
    r_ours = summarise("ours (fp32)", ours)
    n, t_step, tok_step = ours["n_params"], statistics.median(ours["times"]), statistics.median(ours["tokens"])
    flops = 4 * n * tok_step
    achieved = flops / t_step / 1e9
    print(f"  MFU ours: 4*N*T = 4*{n:,}*{tok_step:.0f} = {flops / 1e12:.3f} TFLOP in {t_step:.2f} s = "
          f"{achieved:.1f} GFLOP/s = {100 * achieved / peak:.1f}% of the fp32 GEMM peak")
    r_trl = None
    if trl:
        print(f"  TRL kept {trl['kept']} of {len(pairs)} pairs; train() {trl['total_s']:.1f} s incl. ref precompute")
        r_trl = summarise("TRL DPOTrainer (fp32)", trl)
    if ours_bf16:
        r_b = summarise("ours (DeepSpeed bf16)", ours_bf16)
        print(f"  bf16/fp32 (ours): {r_b / r_ours:.2f}x; loss {ours_bf16['losses'][0]:.4f} -> "
              f"{ours_bf16['losses'][-1]:.4f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("-" * 100)
    if r_trl:
        print(f"RESULT train_tokens_per_s ours={r_ours:.1f} trl={r_trl:.1f} ratio={r_ours / r_trl:.2f} "
              f"(target >= 1.3) mfu={100 * achieved / peak:.1f}%")
    else:
        print(f"RESULT train_tokens_per_s ours={r_ours:.1f} mfu={100 * achieved / peak:.1f}%")


if __name__ == "__main__":
    main()
