"""The Ray Train worker loop: DeepSpeed (ZeRO 0-3) over a LoRA or full model, DPO/IPO/cDPO/SFT.

Each worker sees the same deterministic schedule: epoch e shuffles example indices with
(seed, e); optimizer step s takes the next `batch_size` indices and worker r takes its slice.
Resuming from a checkpoint at step s therefore replays exactly the batches an uninterrupted
run would have seen.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _schedule(n: int, batch: int, epochs: int, seed: int) -> list[list[int]]:
    steps = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(n).tolist()
        steps += [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return steps


def ds_config(cfg: dict, world: int) -> dict:
    grad_acc = cfg["batch_size"] // (cfg["micro_batch_size"] * world)
    return {
        "train_batch_size": cfg["micro_batch_size"] * grad_acc * world,
        "train_micro_batch_size_per_gpu": cfg["micro_batch_size"],
        "gradient_accumulation_steps": grad_acc,
        "zero_optimization": {"stage": cfg["zero_stage"]},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bool(cfg["bf16"])},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_model(cfg: dict):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg["bf16"] and cfg["finetune"] == "full" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype,
                                                 trust_remote_code=cfg.get("trust_remote_code", False))
    if cfg["finetune"] == "lora":
        from peft import LoraConfig, get_peft_model
        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    return model


def train_loop(cfg: dict) -> None:
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    torch.set_num_threads(max(1, int(cfg["threads"])))
    deepspeed.init_distributed(dist_backend=cfg["backend"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = cfg["seed"]
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    examples = ray.get(cfg["examples"])
    model = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=0.0)
    conf = ds_config(cfg, world)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf)
    device = engine.device
    micro, grad_acc = conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]

    steps = _schedule(len(examples), cfg["batch_size"], cfg["epochs"], seed)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, "ds"), tag="state")
            start = json.loads(Path(d, "state.json").read_text())["step"]
    history: list[dict] = []
    if ckpt:
        with ckpt.as_directory() as d:
            if Path(d, "metrics.jsonl").exists():
                history = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines()]

    method, beta, ls = cfg["method"], cfg["beta"], cfg["label_smoothing"]
    pad = cfg["pad_id"]
    fail_at = cfg.get("fail_at_step")  # fault-injection hook for tests
    engine.train()
    for step in range(start, len(steps)):
        t0 = time.perf_counter()
        mine = steps[step][rank * micro * grad_acc:(rank + 1) * micro * grad_acc]
        micro_batches = [[examples[i] for i in mine[m * micro:(m + 1) * micro]] for m in range(grad_acc)]
        sums = optimizer_step(engine, micro_batches, method, beta, ls, pad, device)
        dist.all_reduce(sums)
        dt = time.perf_counter() - t0
        n = sums[6].item()
        metrics = {"step": step + 1, "loss": sums[0].item() / n, "rewards/chosen": sums[1].item() / n,
                   "rewards/rejected": sums[2].item() / n, "rewards/accuracy": sums[3].item() / n,
                   "rewards/margin": sums[4].item() / n, "lr": optimizer.param_groups[0]["lr"],
                   "tokens_per_s": sums[5].item() / dt, "epoch": step * cfg["batch_size"] / max(1, len(examples))}
        history.append(metrics)
        last = step + 1 == len(steps)
        if fail_at is not None and step + 1 == fail_at and rank == world - 1 and not ckpt:
            os._exit(1)  # simulate a dead worker (only on the first attempt)
        if last or (step + 1) % cfg["checkpoint_every"] == 0:
            _report_with_checkpoint(engine, cfg, rank, step + 1, history, metrics, final=last)
        elif (step + 1) % cfg["report_every"] == 0:
            ray.train.report(metrics)


def optimizer_step(engine, micro_batches, method: str, beta: float, label_smoothing: float, pad: int,
                   device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (DeepSpeed steps at the accumulation boundary).

    Returns per-rank sums: loss, reward chosen, reward rejected, accuracy, margin, real tokens, pairs.
    Shared by `train_loop` and bench/train_throughput.py so the benchmark times exactly this step.
    """
    from runner.train.batches import pair_batch, response_logps
    from runner.train.losses import preference_loss

    sums = torch.zeros(7, dtype=torch.float64)
    for ex in micro_batches:
        batch = {k: v.to(device) for k, v in pair_batch(ex, pad).items()}
        logps = response_logps(engine, batch)
        n_tok = batch["response_mask"][:, 1:].sum(-1).float()
        k = len(ex)
        losses, r_c, r_r = preference_loss(method, logps[:k], logps[k:], batch["ref_chosen"], batch["ref_rejected"],
                                           n_tok[:k], n_tok[k:], beta, label_smoothing)
        engine.backward(losses.mean())
        engine.step()
        sums += torch.tensor([losses.sum().item(), r_c.sum().item(), r_r.sum().item(),
                              (r_c > r_r).float().sum().item(), (r_c - r_r).sum().item(),
                              batch["attention_mask"].sum().item(), k], dtype=torch.float64)
    return sums


def _report_with_checkpoint(engine, cfg: dict, rank: int, step: int, history: list[dict], metrics: dict, final: bool):
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if not final:
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag="state")
        if rank == 0:
            Path(tmp, "state.json").write_text(json.dumps({"step": step}))
            Path(tmp, "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=cfg["zero_stage"] == 3):
            if rank == 0 and final:
                engine.module.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
