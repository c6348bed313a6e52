"""The LoRA cells of one base model trained together: one worker group, one frozen base, K adapters.

Each adapter keeps everything it has when trained alone: its data order (its seed's schedule), its
AdamW state, its gradient clipping, its checkpoints, eval_at adapters and metrics. A group step is
one optimizer step of every adapter not yet done; their micro-batches go through the model as one
batch, each token routed to its own adapter (runner.train.adapters). Data parallel as a cell alone:
each worker takes its slice of every step and gradients are averaged over the workers (plain
torch.distributed: ZeRO has nothing worth sharding in a few LoRA adapters, and its clipping is over
all trainable weights at once, where each adapter needs its own). Adapters checkpoint one by one
under their cell's work dir, so a restarted group, or a later group holding some of the same cells,
resumes each adapter where it stopped.

Precision: with bf16 the base runs in bf16 and the adapters, their gradients and Adam state stay in
fp32 (peft's mixed precision); a cell alone under DeepSpeed bf16 computes its adapter in bf16 too,
so the two agree to bf16 rounding, and to 1e-5 in fp32 (tests/test_group.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from runner.store import atomic_dir, read_state
from runner.train.adapters import adapter_state, build_adapters, load_adapter_state, save_adapter
from runner.train.batches import Example, pair_blocks, response_logps
from runner.train.cell import Cell
from runner.train.doses import schedule
from runner.train.losses import LossFn, make_loss
from runner.train.loop import (load_base, metric_sums, progress_dir, progress_steps, record_start,
                               record_step, resumable, step_metrics)
from runner.train.reference import worker_references
from runner.train.safe_load import load_tensors

MAX_GRAD_NORM = 1.0  # as a cell alone (runner.train.loop.ds_config)
# Fault injection (tests, in the style of VALIND_FAIL_AT_STEP): a forward of more than N adapters'
# micro-batches raises torch.OutOfMemoryError, as a GPU too small for it would, on every attempt.
OOM_ABOVE_ENV = "VALIND_OOM_ABOVE"
# ... and "N@S": the optimizer step of a group of more than N adapters raises it once N adapters have
# stepped, from the adapters' step S on (default 0, the first, where AdamW allocates its state).
OOM_STEP_ENV = "VALIND_OOM_STEP_ABOVE"


class GroupOutOfMemory(RuntimeError):
    """The group's adapters must train in smaller groups: out of memory at one adapter per forward (the
    slots are as before the step: `intact`), or in the optimizer step (some adapters stepped, some not:
    only their checkpoints on disk are sound)."""

    def __init__(self, message: str, intact: bool):
        super().__init__(message)
        self.intact = intact


def oom_file(cell: Cell) -> Path:
    """The note a group that ran out of memory at one adapter per forward leaves for the driver, beside
    the cell's checkpoint: {"adapters": its group's size} (runner.stages.train splits such groups)."""
    return Path(cell.work_dir) / cell.cell_id / "valind-oom.json"


def out_of_memory(cell: Cell) -> str | None:
    """Where this cell last ran out of memory in a group (oom_file), in words, or None."""
    note = read_state(oom_file(cell))
    return f"{note['where']} of a group of {note['adapters']} adapter(s)" if isinstance(note, dict) else None


def splittable(cell: Cell) -> bool:
    """Whether the cell last ran out of memory in a group of more than one adapter: a smaller group,
    down to the cell alone, may fit (runner.stages.train splits it); alone, it cannot."""
    note = read_state(oom_file(cell))
    return isinstance(note, dict) and note.get("adapters", 0) > 1


def checkpoint_dir(cell: Cell) -> Path:
    """An adapter's latest checkpoint (weights, Adam state, step, metrics), beside its starts file."""
    return Path(cell.work_dir) / cell.cell_id / "valind-adapter"


def final_dir(cell: Cell) -> Path:
    """An adapter done training: model/ and metrics.jsonl, for the driver to publish."""
    return Path(cell.work_dir) / cell.cell_id / "valind-final"


def finished(cell: Cell) -> bool:
    """Whether the cell's adapter finished training under this cell's key (final_dir)."""
    state = read_state(final_dir(cell) / "state.json")
    return state is not None and resumable(cell, state) is not None


@dataclass
class Slot:
    """One adapter of the group, as one worker sees it."""
    cell: Cell
    name: str
    examples: list[Example]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    steps: list[list[int]]
    step: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= len(self.steps)


class HeapCap:
    """Keeps a CPU worker's resident memory from creeping up over many forwards.

    glibc keeps the freed activations of micro-batches of varying lengths as a fragmented heap: over
    the 80 forwards of a 4-adapter demo group, a worker's resident memory grew from 2.5 to 4.0 GB.
    malloc_trim hands the free pages back, and the next forward faults them in again: it runs only
    when resident memory exceeds `ratio` times its level after the first forward. In
    bench/multi_adapter.py, ratio 1.1 cost 30% of step time (memory 1.09x one cell), 1.3 cost 8%
    (memory 1.31x; 1.40-1.82x without it). Where malloc_trim is not there (not glibc) or on GPUs
    it does nothing: results are the same either way."""

    def __init__(self, device, ratio: float = 1.3):
        self.ratio, self.base, self._proc = ratio, None, psutil.Process()
        lib = ctypes.util.find_library("c") if device.type == "cpu" else None
        self._trim = getattr(ctypes.CDLL(lib), "malloc_trim", None) if lib else None

    def __call__(self) -> None:
        if self._trim is None:
            return
        rss = self._proc.memory_info().rss
        if self.base is None:
            self.base = rss
        elif rss > self.ratio * self.base:
            self._trim(0)


def group_step(model, router, forwards: list[dict[int, list[Example]]], loss_fn: LossFn, pad: int,
               device, n_adapters: int, grad_acc: int, heap: HeapCap) -> torch.Tensor:
    """Forwards and backwards of one optimizer step of the adapters in `forwards` (per forward: adapter
    index → its micro-batch; each adapter has grad_acc micro-batches in all). Returns per-adapter
    sums [K, 7] as runner.train.loop.optimizer_step. `heap` is called after each backward (HeapCap)."""
    sums = torch.zeros(n_adapters, 7, dtype=torch.float64, device=device)
    above = int(os.environ[OOM_ABOVE_ENV]) if os.environ.get(OOM_ABOVE_ENV) else None
    for exs in forwards:
        batch = {key: v.to(device) for key, v in pair_blocks(list(exs.values()), pad).items()}
        owner = torch.tensor([k for k, ex in exs.items() for _ in range(2 * len(ex))], device=device)
        with router.route(owner):
            logps = response_logps(model, batch, on_layout=router.layout)
            n_tok = batch["response_mask"][:, 1:].sum(-1).float()
            total, c, i = 0.0, 0, 0  # adapter k's chosen rows start at c, its pairs at i
            for k, ex in exs.items():
                b, r = len(ex), c + len(ex)
                losses, r_c, r_r = loss_fn(logps[c:r], logps[r:r + b], batch["ref_chosen"][i:i + b],
                                           batch["ref_rejected"][i:i + b], n_tok[c:r], n_tok[r:r + b])
                total = total + losses.mean()
                sums[k] += metric_sums(losses, r_c, r_r, batch["attention_mask"][c:r + b].sum(), device)
                c, i = r + b, i + b
            # a cell alone back-propagates each micro-batch's mean loss / accumulation steps (DeepSpeed)
            (total / grad_acc).backward()
        if above is not None and len(exs) > above:  # after its backward: gradients left behind, as a real one may
            raise torch.OutOfMemoryError(f"{OOM_ABOVE_ENV}={above}: a forward of {len(exs)} adapters (injected)")
        heap()
    return sums


def apply_step(slots: list[Slot], world: int, oom_after: int | None = None) -> bool:
    """Average the active adapters' gradients over workers, clip each adapter alone, step its AdamW.
    False where any worker ran out of memory stepping (injected after `oom_after` adapters stepped)."""
    for s in slots:
        for p in s.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    if world > 1:
        grads = [p.grad for s in slots for p in s.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
    oom = False
    try:
        for i, s in enumerate(slots):
            if i == oom_after:
                raise torch.OutOfMemoryError(f"{OOM_STEP_ENV}: the optimizer step of {len(slots)} adapters (injected)")
            torch.nn.utils.clip_grad_norm_(s.params, MAX_GRAD_NORM)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        oom = True
    return not _any_worker(oom, world, slots[0].params[0].device)


def _any_worker(flag: bool, world: int, device) -> bool:
    """Whether `flag` holds on any worker (every worker calls it: one small all_reduce)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def _step_oom_after(n_slots: int, step: int) -> int | None:
    """The OOM_STEP_ENV injection for a group of `n_slots` adapters at the adapters' `step`: after how
    many adapters the optimizer step runs out of memory, or None."""
    above, _, start = os.environ.get(OOM_STEP_ENV, "").partition("@")
    if not above or n_slots <= int(above) or step < int(start or 0):
        return None
    return int(above)


def build_group(cells: list[Cell], examples: list[list[Example]], device):
    """The frozen base with one routed adapter per cell; (model, router, slots)."""
    train = cells[0].train
    model, router, params = build_adapters(load_base(cells[0]), train.lora, [c.seed for c in cells])
    model.to(device)
    slots = [Slot(c, name, ex, ps, torch.optim.AdamW(ps, lr=train.lr, weight_decay=0.0),
                  schedule(len(ex), train.batch_size, train.epochs, c.seed, c.steps))
             for c, name, ex, ps in zip(cells, router.names, examples, params)]
    return model, router, slots


def _resume(model, slot: Slot) -> bool:
    """Load the slot's own checkpoint, if it has one (final_dir: it is done). True if it resumed."""
    for d in (final_dir(slot.cell), checkpoint_dir(slot.cell)):
        if (d / "state.json").is_file():
            state = resumable(slot.cell, read_state(d / "state.json", {}))
            if state is None:
                continue
            slot.step = state["step"]
            slot.history = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            if d == checkpoint_dir(slot.cell):
                load_adapter_state(model, slot.name, load_file(d / "adapter.safetensors"))
                slot.optimizer.load_state_dict(load_tensors(d / "optimizer.pt"))
            return True
    return False


def _save(model, slot: Slot, final: bool) -> None:
    with atomic_dir(final_dir(slot.cell) if final else checkpoint_dir(slot.cell)) as tmp:
        if final:
            save_adapter(model, slot.name, tmp / "model")
        else:
            save_file(adapter_state(model, slot.name), tmp / "adapter.safetensors")
            torch.save(slot.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in slot.history))
        (tmp / "state.json").write_text(json.dumps({"step": slot.step, "key": slot.cell.key}))


def group_loop(cfg: dict) -> None:
    """The worker: cfg is {"cells": [Cell], "examples": [ObjectRef of list[Example]] (one per cell),
    "pad_id", "per_forward", "fail_at_step"}. Out of memory at one adapter per forward (run_steps), it
    saves every unfinished adapter, leaves each an oom_file and returns: an error would only be
    retried by Ray Train (train.max_failures) into the same error."""
    # deferred: Ray Train, in the training worker only (bench/group_check.py runs the group without Ray)
    import ray
    import ray.train
    import ray.train.torch

    cells: list[Cell] = cfg["cells"]
    train = cells[0].train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    device = ray.train.torch.get_device() if train.gpus_per_worker > 0 else torch.device("cpu")
    model, router, slots = build_group(cells, ray.get(cfg["examples"]), device)
    # the reference log-probs the cache lacks, data-parallel over the workers, before any step
    worker_references(model, [s.examples for s in slots], cfg.get("references", [None] * len(slots)), cfg["pad_id"],
                      device, rank, world, router=router)
    resumed = any([_resume(model, s) for s in slots])  # every slot loads its own checkpoint
    for s in slots if rank == 0 else ():
        record_start(s.cell, s.step)
        oom_file(s.cell).unlink(missing_ok=True)  # this start's memory is another question
    save_at = {s.name: progress_steps(s.cell.train.eval_at, len(s.steps)) for s in slots}  # a cell's own points
    fail_at = cfg.get("fail_at_step")
    every_s, saved = train.checkpoint_seconds(), time.monotonic()
    steps = run_steps(model, router, slots, cfg["pad_id"], device, rank, world, cfg["per_forward"])
    try:
        for stepped in steps:
            # rank 0 alone saves, so its clock alone decides
            due = every_s is not None and time.monotonic() - saved >= every_s
            for s in stepped if rank == 0 else ():
                record_step(s.cell, s.step, len(s.steps))
                _checkpoint(model, s, save_at[s.name].get(s.step, []), due)
            saved = time.monotonic() if due else saved
            if fail_at is not None and any(s.step == fail_at for s in stepped) and not resumed:
                _die(rank, world)
    except GroupOutOfMemory as e:
        if rank == 0:
            leave_for_split(model, slots, e)
            print(f"{e}: each adapter left at its " + ("step" if e.intact else "last checkpoint")
                  + ", for smaller groups (runner.stages.train)", flush=True)


def leave_for_split(model, slots: list[Slot], e: GroupOutOfMemory) -> None:
    """Rank 0, after GroupOutOfMemory: each unfinished adapter's oom_file, for the smaller groups the
    driver makes of them, which resume it from its checkpoint: saved now where the slots are as before
    the step that failed (e.intact); else the last one saved (a part-taken optimizer step is lost)."""
    where = "a forward of one adapter" if e.intact else "the optimizer step"
    for s in slots:
        if not s.done:
            if e.intact:
                _save(model, s, final=False)
            oom_file(s.cell).parent.mkdir(parents=True, exist_ok=True)
            oom_file(s.cell).write_text(json.dumps({"adapters": len(slots), "where": where}))


def _die(rank: int, world: int) -> None:
    """Fault injection (tests; first attempt only): the last worker dies after this group step, once
    rank 0 has saved it (a barrier), so that the resume point is known."""
    if world > 1:
        dist.barrier()
    if rank == world - 1:
        os._exit(1)


def _checkpoint(model, s: Slot, fractions: list[float], due: bool) -> None:
    """After one of the slot's steps: its eval_at adapters (`fractions` ending at this step), and its
    checkpoint, a resume point, at each of them, every train.checkpoint_every steps, when
    train.checkpoint_every_s is `due`, and at its end (final_dir)."""
    for f in fractions:
        with atomic_dir(progress_dir(s.cell, f)) as tmp:
            save_adapter(model, s.name, tmp)
    if s.done or fractions or due or s.step % s.cell.train.checkpoint_every == 0:
        _save(model, s, final=s.done)


def run_steps(model, router, slots: list[Slot], pad: int, device, rank: int = 0, world: int = 1,
              per_forward: int | None = None):
    """Train the slots to the end, `per_forward` adapters' micro-batches per forward (default: all);
    yields the slots that stepped after every group step. A step that runs out of memory on any
    worker is taken again by every worker at half as many adapters per forward, down to one, and that
    number holds from then on (the adapters are the same at any number: tests/test_group_memory.py);
    out of memory at one, GroupOutOfMemory, with the slots as they were before the step."""
    train = slots[0].cell.train
    loss_fn, micro = make_loss(train), train.micro_batch_size
    grad_acc = train.batch_size // (micro * world)
    heap = HeapCap(device)
    model.train()
    limit = per_forward
    while active := [k for k, s in enumerate(slots) if not s.done]:
        t0 = time.perf_counter()
        per = min(limit or len(active), len(active))
        forwards = []
        for m in range(grad_acc):
            for j in range(0, len(active), per):
                fwd = {}
                for k in active[j:j + per]:  # as a cell alone: micro-batch m of this rank's slice of the step
                    s = slots[k]
                    mine = s.steps[s.step][rank * micro * grad_acc:(rank + 1) * micro * grad_acc]
                    fwd[k] = [s.examples[i] for i in mine[m * micro:(m + 1) * micro]]
                forwards.append(fwd)
        sums = _attempt(model, router, slots, forwards, (loss_fn, pad, grad_acc, heap), device, world)
        if sums is None:
            if per == 1:
                raise GroupOutOfMemory(f"a group of {len(slots)} adapters ran out of memory at 1 adapter per forward",
                                       intact=True)
            limit = per // 2
            if rank == 0:
                print(f"group of {len(slots)} adapters: out of memory at {per} adapters per forward; taking the "
                      f"step again at {limit} per forward", flush=True)
            continue
        # more adapters per forward would not help here: AdamW's state is per adapter, smaller groups may
        if not apply_step([slots[k] for k in active], world, _step_oom_after(len(slots), slots[active[0]].step)):
            raise GroupOutOfMemory(f"a group of {len(slots)} adapters ran out of memory in the optimizer step",
                                   intact=False)
        if world > 1:
            dist.all_reduce(sums)
        dt = time.perf_counter() - t0
        for k in active:
            s = slots[k]
            s.history.append({**step_metrics(sums[k].tolist(), s.step + 1, train.lr, dt,
                                             s.step * train.batch_size / max(1, len(s.examples))),
                              "group_adapters": len(active), "per_forward": per})
            s.step += 1
        yield [slots[k] for k in active]


def _attempt(model, router, slots: list[Slot], forwards, how: tuple, device, world: int) -> torch.Tensor | None:
    """group_step's sums (`how`: its loss_fn, pad, grad_acc, heap), or None where any worker ran out
    of memory: every worker then drops the step's gradients, so that all retry it together (none is
    left waiting in apply_step's all_reduce)."""
    loss_fn, pad, grad_acc, heap = how
    try:
        sums, oom = group_step(model, router, forwards, loss_fn, pad, device, len(slots), grad_acc, heap), False
    except torch.OutOfMemoryError:
        sums, oom = None, True
    # out of the handler: the error's frames, and the activations they held, are released
    if not _any_worker(oom, world, device):
        return sums
    for s in slots:
        s.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the failed step's cached blocks, for the smaller forwards
    return None
