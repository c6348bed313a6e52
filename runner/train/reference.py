"""The frozen base model's response log-probs of preference pairs: DPO's reference.

They are computed inside a cell's (or group's) worker group at step 0 (`worker_references`), each
worker taking its share of the micro-batches, and cached on disk per (model, subset, precision)
(`cache_paths`): a later cell of the same subset reads them from there. `subsets_logps` is the same
pass on one process, free of Ray and of torch.distributed (bench/group_check.py, tests)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from runner.progress import say
from runner.spec import content_hash
from runner.store import read_state, write_json
from runner.train.batches import Example, pair_batch, response_logps

# Pairs per reference forward. The batches decide the packing (runner.train.batches.pack_rows) and so
# the last bits of each sum: every pass cuts a subset into the same micro-batches, wherever it runs.
REF_MICRO = 4

Values = list[tuple[float, float]]


def subsets_logps(model_path: str, subsets: list[list[Example]], micro: int, threads: int,
                  trust_remote_code: bool, bf16: bool) -> list[Values]:
    """runner.train.launch.compute_reference_logps of several subsets with one model load, on one
    process (bench/group_check.py, bench/train_throughput.py, tests)."""
    from transformers import AutoModelForCausalLM  # deferred: transformers takes ~2 s to import, for this pass only

    torch.set_num_threads(max(1, threads))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 trust_remote_code=trust_remote_code).to(device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    chunks = [[ex[i:i + micro] for i in range(0, len(ex), micro)] for ex in subsets]
    values = _chunks_logps(model, None, [c for cs in chunks for c in cs], pad, device)
    out, i = [], 0
    for cs in chunks:
        out.append([v for c in values[i:i + len(cs)] for v in c])
        i += len(cs)
    return out


def base_logps(model, router, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen base's summed response log-probs of a batch (runner.train.batches.response_logps).

    A peft model runs with its adapters disabled; a group's model (runner.train.adapters, whose routed
    layers ignore peft's switch) with its `router` routing no token to any adapter: either way every
    LoRA layer returns its base layer's output, the base model's own numbers."""
    if router is not None:
        no_adapter = torch.full((batch["input_ids"].shape[0],), -1, device=batch["input_ids"].device)
        with router.route(no_adapter):
            return response_logps(model, batch, on_layout=router.layout)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        return response_logps(model, batch)


def _chunks_logps(model, router, chunks: list[list[Example]], pad: int, device) -> list[Values]:
    """(chosen, rejected) per pair of each chunk, one forward per chunk, in eval mode (no dropout)."""
    if not chunks:
        return []
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for chunk in chunks:
                lp = base_logps(model, router, {k: v.to(device) for k, v in pair_batch(chunk, pad).items()}).cpu()
                out.append(list(zip(lp[:len(chunk)].tolist(), lp[len(chunk):].tolist())))
    finally:
        model.train(was_training)
    return out


def cache_paths(model_id: str, bf16: bool, subsets: list[list[Example]], cache_dir: str) -> list[Path]:
    """Each subset's cache file: its pairs' tokens, the model and the precision (bf16 references would
    differ from fp32 ones) hashed."""
    return [Path(cache_dir) / (content_hash("reflogps-v1", model_id,
                                            [(e.pair_id, e.prompt, e.chosen, e.rejected) for e in examples],
                                            *(["bf16"] if bf16 else [])) + ".json")
            for examples in subsets]


def cached_logps(path: Path, n: int) -> list | None:
    """A cached reference pass, if it is whole: one (chosen, rejected) pair of numbers per example."""
    v = read_state(path)
    ok = (isinstance(v, list) and len(v) == n
          and all(isinstance(x, list) and len(x) == 2 and all(isinstance(y, (int, float)) for y in x) for x in v))
    if v is not None and not ok:
        say(f"reference log-probs {path} do not match their {n} examples: computed again")
    return v if ok else None


def fill(examples: list[Example], values: list) -> None:
    for e, (c, r) in zip(examples, values):
        e.ref_chosen, e.ref_rejected = c, r


def worker_references(model, subsets: list[list[Example]], paths: list[str | None], pad: int, device,
                      rank: int, world: int, router=None) -> None:
    """Step 0 of a worker group: fill ref_chosen/ref_rejected of each subset whose path is set (the
    driver found no cache for it) from the frozen base under `model` (`base_logps`), data-parallel.

    Every rank runs it with the same arguments. Rank 0 reads the caches first (a restarted group finds
    what its first start wrote) and tells the others; the rest is cut into REF_MICRO-pair micro-batches,
    dealt out in turn over the ranks, gathered on every rank and written by rank 0. Subsets with one
    path (seeds of one condition: the same pairs) are computed once and filled in each."""
    todo: dict[str, list[list[Example]]] = {}
    for examples, p in zip(subsets, paths):
        if p is not None:
            todo.setdefault(p, []).append(examples)
    if not todo:
        return
    cached = [cached_logps(Path(p), len(exs[0])) if rank == 0 else None for p, exs in todo.items()]
    if world > 1:
        dist.broadcast_object_list(cached, src=0)
    missing = [p for p, v in zip(todo, cached) if v is None]
    chunks = [(p, i) for p in missing for i in range(0, len(todo[p][0]), REF_MICRO)]
    mine = chunks[rank::world]
    values = _chunks_logps(model, router, [todo[p][0][i:i + REF_MICRO] for p, i in mine], pad, device)
    computed = dict(zip(mine, values))
    if world > 1:
        parts: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(parts, computed)
        computed = {k: v for part in parts for k, v in part.items()}
    for p, v in zip(todo, cached):
        if v is None:
            v = [x for i in range(0, len(todo[p][0]), REF_MICRO) for x in computed[p, i]]
            if rank == 0:
                write_json(v, Path(p))
        for examples in todo[p]:
            fill(examples, v)
