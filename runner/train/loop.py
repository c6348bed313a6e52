"""The Ray Train worker loop: DeepSpeed (ZeRO 0-3) over a LoRA or full model, DPO/IPO/cDPO/SFT.

Each worker sees the same deterministic schedule: epoch e shuffles example indices with
(seed, e); optimizer step s takes the next `batch_size` indices and worker r takes its slice.
Resuming from a checkpoint at step s therefore replays exactly the batches an uninterrupted
run would have seen.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runner.cluster import local_accelerator
from runner.spec import TrainSpec
from runner.store import atomic_dir, read_state
from runner.train.adapters import add_lora
from runner.train.batches import pair_batch, response_logps
from runner.train.cell import Cell
from runner.train.doses import schedule
from runner.train.losses import LossFn, make_loss
from runner.train.reference import worker_references
from runner.train.safe_load import safe_deepspeed_loads


def dist_backend(train: TrainSpec) -> str:
    """The torch.distributed backend of a cell's worker group."""
    return "nccl" if train.gpus_per_worker > 0 else "gloo"


def load_comm_op() -> None:
    """Load DeepSpeed's shared-memory comm op, clearing a build lock left by a killed process.

    torch's JIT loader takes a lock *file* on every load, even with nothing to build, and waits
    forever on one whose holder died: a node lost while its workers started left every later
    training cell hanging. An flock dies with its holder, so whoever holds it knows that any lock
    file is stale. DeepSpeed then reuses the loaded op instead of loading it again.
    """
    local_accelerator()
    # deferred: DeepSpeed (~3 s) picks its accelerator (DS_ACCELERATOR) when first imported: after the line above
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not use it either (CUDA: NCCL)
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    with open(build_dir.parent / f".{builder.NAME}.valind-lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        builder.load(verbose=False)


def ds_config(train: TrainSpec, world: int) -> dict:
    if not isinstance(train.bf16, bool):
        raise ValueError(f"train.bf16 must be resolved to True/False before training, got {train.bf16!r}")
    grad_acc = train.batch_size // (train.micro_batch_size * world)
    return {
        "train_batch_size": train.micro_batch_size * grad_acc * world,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_acc,
        "zero_optimization": {"stage": train.zero_stage},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": train.bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_model(cell: Cell):
    """The cell's model: the base with its LoRA adapter (seeded by the cell), or the whole base."""
    model = load_base(cell)
    if cell.train.finetune == "lora":
        model = add_lora(model, cell.train.lora, cell.seed)
    return model


def load_base(cell: Cell):
    """The base model in the cell's training precision, with activation checkpointing if asked."""
    from transformers import AutoModelForCausalLM  # deferred: transformers (~2 s), in the training worker only

    train = cell.train
    # bf16 training loads in bf16: DeepSpeed would cast the module anyway, after a peak at fp32 size.
    dtype = torch.bfloat16 if train.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cell.model_path, dtype=dtype, trust_remote_code=cell.trust_remote_code)
    if train.gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates into LoRA weights without inputs that require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def starts_file(cell) -> Path:
    """Where each start of the cell's worker group is recorded (in Ray Train's run dir, on shared storage)."""
    d = Path(cell.work_dir) / cell.cell_id
    d.mkdir(parents=True, exist_ok=True)
    return d / "valind-starts.txt"


def record_start(cell, step: int) -> None:
    """Rank 0's line for each start of a worker group training the cell: the step it starts from."""
    with open(starts_file(cell), "a") as f:
        f.write(f"{step}\n")


def record_step(cell, step: int, total: int) -> None:
    """Rank 0's note of the cell's optimizer steps so far, for the driver's progress bar (`steps_done`)."""
    (Path(cell.work_dir) / cell.cell_id / "valind-step").write_text(f"{step} {total}")


def steps_done(cells) -> tuple[int, int]:
    """(optimizer steps done, steps in all) over the cells that have started."""
    done = total = 0
    for cell in cells:
        try:
            a, b = map(int, (Path(cell.work_dir) / cell.cell_id / "valind-step").read_text().split())
        except (OSError, ValueError):
            continue
        done, total = done + a, total + b
    return done, total


def progress_dir(cell, fraction: float) -> Path:
    """Where the adapter at `fraction` of the schedule is saved (train.eval_at), beside the starts file."""
    return Path(cell.work_dir) / cell.cell_id / "valind-progress" / f"{fraction:g}"


def progress_steps(eval_at: list[float], n_steps: int) -> dict[int, list[float]]:
    """Optimizer step → the eval_at fractions (below 1) saved after it: step round(f × n), at least 1."""
    out: dict[int, list[float]] = {}
    for f in eval_at:
        if f < 1:
            out.setdefault(min(n_steps, max(1, round(f * n_steps))), []).append(f)
    return out


def resumable(cell, state: dict, rank: int = 0) -> dict | None:
    """A checkpoint's state if it was written for this cell's key; else None, and the cell starts
    fresh (rank 0 says why): a checkpoint of other settings must never become this cell's start."""
    if isinstance(state, dict) and state.get("key") == cell.key and isinstance(state.get("step"), int):
        return state
    if rank == 0:
        found = state.get("key") if isinstance(state, dict) else None
        print(f"{cell.cell_id}: its checkpoint was written for key {found!r}, not this cell's {cell.key!r}: "
              "training starts fresh", flush=True)
    return None


def train_loop(cfg: dict) -> None:
    """The worker: cfg is {"cell": Cell, "examples": ObjectRef of list[Example], "pad_id", "fail_at_step"}."""
    local_accelerator()  # before DeepSpeed's first import in this worker
    # deferred: DeepSpeed (~3 s, after local_accelerator) and Ray Train, in the training worker only
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    cell: Cell = cfg["cell"]
    train = cell.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ckpt, start, history = _checkpoint_to_resume(cell, ray.train.get_checkpoint(), rank)
    if rank == 0:  # first thing, one line per worker-group start
        record_start(cell, start)
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    load_comm_op()
    deepspeed.init_distributed(dist_backend=dist_backend(train))
    seed = cell.seed
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    examples = ray.get(cfg["examples"])
    model = build_model(cell)
    # Reference log-probs the cache lacks, on every worker, from the weights training starts from:
    # before DeepSpeed wraps the model (ZeRO-3 would shard it; it moves the model to the device anyway).
    device = ray.train.torch.get_device() if train.gpus_per_worker > 0 else torch.device("cpu")
    worker_references(model.to(device), [examples], [cfg.get("reference")], cfg["pad_id"], device, rank, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=0.0)
    conf = ds_config(train, world)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf)
    _exclude_every_frozen_name(engine)
    device = engine.device
    micro, grad_acc = conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]

    steps = schedule(len(examples), train.batch_size, train.epochs, seed, cell.steps)
    save_at = progress_steps(train.eval_at, len(steps))
    if ckpt:
        safe_deepspeed_loads(engine)  # weights_only=True: a planted pickle in shared storage is refused, not run
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, "ds"), tag="state", load_module_strict=False)  # frozen: from the model

    loss_fn = make_loss(train)
    pad = cfg["pad_id"]
    fail_at = cfg.get("fail_at_step")  # fault-injection hook for tests
    engine.train()
    every_s, saved = train.checkpoint_seconds(), time.monotonic()
    for step in range(start, len(steps)):
        t0 = time.perf_counter()
        mine = steps[step][rank * micro * grad_acc:(rank + 1) * micro * grad_acc]
        micro_batches = [[examples[i] for i in mine[m * micro:(m + 1) * micro]] for m in range(grad_acc)]
        sums = optimizer_step(engine, micro_batches, loss_fn, pad, device)
        dist.all_reduce(sums)
        dt = time.perf_counter() - t0
        metrics = step_metrics(sums.tolist(), step + 1, optimizer.param_groups[0]["lr"], dt,
                               step * train.batch_size / max(1, len(examples)))
        history.append(metrics)
        if rank == 0:
            record_step(cell, step + 1, len(steps))
        last = step + 1 == len(steps)
        if step + 1 in save_at:  # before the step's checkpoint: a resume past it never misses it
            _save_progress(engine, train.zero_stage, rank, [progress_dir(cell, f) for f in save_at[step + 1]])
        if fail_at is not None and step + 1 == fail_at and rank == world - 1 and not ckpt:
            os._exit(1)  # simulate a dead worker (only on the first attempt)
        # a resume point at each eval_at point too: a failure there resumes from the saved adapter
        due = time_due(every_s, saved, world, device)
        if last or (step + 1) % train.checkpoint_every == 0 or step + 1 in save_at or due:
            _report_with_checkpoint(engine, cell, rank, step + 1, history, metrics, final=last)
            saved = time.monotonic()
        elif (step + 1) % train.report_every == 0:
            ray.train.report(metrics)


def _checkpoint_to_resume(cell: Cell, ckpt, rank: int) -> tuple:
    """(the checkpoint, the step to resume from, the metrics before it); (None, 0, []) when there is
    none or it is another cell's state (runner.train.loop.resumable)."""
    if not ckpt:
        return None, 0, []
    with ckpt.as_directory() as d:
        state = resumable(cell, read_state(Path(d, "state.json"), {}), rank)
        if state is None:
            return None, 0, []
        metrics = Path(d, "metrics.jsonl")
        history = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        return ckpt, state["step"], history


def time_due(every_s: float | None, since: float, world: int, device) -> bool:
    """Whether train.checkpoint_every_s (resolved: TrainSpec.checkpoint_seconds) has passed since
    `since` by rank 0's clock, which every rank follows: DeepSpeed's save is collective."""
    if every_s is None:
        return False
    due = torch.tensor([float(time.monotonic() - since >= every_s)], device=device)
    if world > 1:
        dist.broadcast(due, 0)
    return bool(due.item())


def _exclude_every_frozen_name(engine) -> None:
    """DeepSpeed's exclude_frozen_parameters drops frozen weights by their first name only, so a
    tied one (lm_head.weight = embed_tokens.weight, the whole vocabulary matrix) is still saved.
    Drop every name a frozen parameter has."""
    frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    own = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        sd = own(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        for name in frozen & set(sd) if exclude_frozen_parameters else ():
            del sd[name]
        return sd

    engine.module_state_dict = module_state_dict


def optimizer_step(engine, micro_batches, loss_fn: LossFn, pad: int, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (DeepSpeed steps at the accumulation boundary).

    `loss_fn` is the cell's `runner.train.losses.make_loss(train)`. Returns per-rank sums: loss, reward
    chosen, reward rejected, accuracy, margin, real tokens, pairs. Shared by `train_loop` and
    bench/train_throughput.py so the benchmark times exactly this step.
    """
    # On the training device: NCCL (GPU workers) has no all_reduce of CPU tensors, and summing there
    # spares a host sync per micro-batch.
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    for ex in micro_batches:
        batch = {k: v.to(device) for k, v in pair_batch(ex, pad).items()}
        logps = response_logps(engine, batch)
        n_tok = batch["response_mask"][:, 1:].sum(-1).float()
        k = len(ex)
        losses, r_c, r_r = loss_fn(logps[:k], logps[k:], batch["ref_chosen"], batch["ref_rejected"],
                                   n_tok[:k], n_tok[k:])
        engine.backward(losses.mean())
        engine.step()
        sums += metric_sums(losses, r_c, r_r, batch["attention_mask"].sum(), device)
    return sums


def metric_sums(losses, r_c, r_r, tokens, device) -> torch.Tensor:
    """A micro-batch's sums (float64): loss, reward chosen, reward rejected, accuracy, margin, real
    tokens, pairs."""
    parts = (losses.detach().sum(), r_c.sum(), r_r.sum(), (r_c > r_r).sum(), (r_c - r_r).sum(), tokens,
             torch.tensor(len(losses), device=device))
    return torch.stack([p.to(device=device, dtype=torch.float64) for p in parts])


def step_metrics(sums: list[float], step: int, lr: float, dt: float, epoch: float) -> dict:
    """A step's metrics line (metrics.jsonl) from its sums over every rank (`metric_sums`)."""
    n = sums[6]
    return {"step": step, "loss": sums[0] / n, "rewards/chosen": sums[1] / n, "rewards/rejected": sums[2] / n,
            "rewards/accuracy": sums[3] / n, "rewards/margin": sums[4] / n, "lr": lr,
            "tokens_per_s": sums[5] / dt, "epoch": epoch, "step_s": dt}


def _save_progress(engine, zero_stage: int, rank: int, dirs: list[Path]) -> None:
    import deepspeed  # deferred: DeepSpeed (~3 s), imported by train_loop in the worker that calls this

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None,
                                           enabled=zero_stage == 3):
        for d in dirs if rank == 0 else ():
            with atomic_dir(d) as tmp:
                engine.module.save_pretrained(tmp, safe_serialization=True)


def _report_with_checkpoint(engine, cell, rank: int, step: int, history: list[dict], metrics: dict,
                            final: bool):
    # deferred: DeepSpeed (~3 s) and Ray Train, imported by train_loop in the worker that calls this
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if not final:
            # Frozen weights (a LoRA cell's whole base model) are reloaded from the model, not the
            # checkpoint: saving them would cost the base model's size per cell and checkpoint.
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag="state", exclude_frozen_parameters=True)
            if rank == 0:
                metrics["checkpoint_mb"] = sum(p.stat().st_size for p in Path(tmp, "ds").rglob("*") if p.is_file()) / 2**20
        if rank == 0:
            Path(tmp, "state.json").write_text(json.dumps({"step": step, "key": cell.key}))
            Path(tmp, "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=cell.train.zero_stage == 3):
            if rank == 0 and final:
                engine.module.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
