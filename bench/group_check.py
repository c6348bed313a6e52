"""Grouped LoRA training as jobs/paper.yaml runs it (runner.train.group), checked against each cell alone.

K adapters over one frozen base, their micro-batches in one forward, each token routed to its own
adapter (runner.train.adapters), each adapter with its own data order, AdamW state and clipping:
what `train.adapters_per_group` does for every LoRA study. With more than one GPU the group runs
data parallel under torch.distributed with NCCL (world size = GPUs, one process per GPU; the
gradients are all-reduced by runner.train.group.apply_step), else in one process. Each adapter is
then compared with its cell trained alone in one process by the single-cell path's math (peft's
own unrouted adapter, runner.train.loop.build_model, the same loss, schedule, accumulation,
clipping and AdamW), as tests/test_group.py does on the CPU in fp32 to 1e-5:

- `max_abs_diff`, the largest |together - alone| over the adapter's weights, below 1e-3 in bf16
  (1e-5 in fp32);
- `rel_diff`, ||together - alone|| / ||alone - initial||: the difference against how far the
  adapter moved, below 0.25 in bf16 (1e-3 in fp32). The learning rate is small enough that rounding
  never reaches 1e-3, so this second bound is what makes the check fail for an adapter trained on
  another cell's data or not trained at all (both ~1 or more; tests/test_gpu_group.py);
- the step-1 loss is ln 2 (policy == reference: LoRA's B starts at zero) and every adapter moved.

The model is a Llama with random weights from a config (no download, no tokenizer: the pairs are
random token ids) and references are the base model's log-probs (runner.train.reference, as the
study computes them, in the policy's precision). Needs torch, transformers, peft, pandas,
pyyaml, psutil and pydantic (runner.spec): no Ray, DeepSpeed or vLLM (docs/GPU_CHECK.md).

    python bench/group_check.py                       # CUDA: 135M shape, bf16, every GPU
    python bench/group_check.py --device cpu          # tiny shape, fp32, one process (--world 2: gloo)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Llama shapes with random weights: SmolLM2-135M's (as bench/gpu_check.py), and a tiny one for CPUs.
SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
# Per precision: (learning rate, max |together - alone|, max relative difference). bf16's lr keeps
# Adam's sign-like steps (~lr each) well inside 1e-3 even where rounding flips a tiny gradient's sign.
SETTINGS = {"bf16": (1e-4, 1e-3, 0.25), "fp32": (1e-3, 1e-5, 1e-3)}
STEPS = (3, 5, 4)  # unequal optimizer steps per adapter: the group shrinks as adapters finish
PAD = 0


def write_model(shape: dict, out: Path) -> None:
    """A local HF dir of a Llama with random (seeded) weights in fp32: each path loads its precision."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=PAD)).save_pretrained(out)


def examples(n: int, length: int, vocab: int, seed: int = 0):
    """n pairs of random token ids, prompts and responses of varying length (padding on every row
    but the longest), ids above the pad id."""
    from runner.train.batches import Example

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(1, vocab) for _ in range(k)]  # noqa: E731
    return [Example(f"p{i}", ids(rng.randint(length // 8, length // 4)), ids(rng.randint(length // 4, length // 2)),
                    ids(rng.randint(length // 4, length // 2))) for i in range(n)]


def cells(model_dir: Path, train, n: int):
    from runner.train.cell import Cell
    return [Cell(cell_id=f"c{k}", seed=5 + k, train=train, pairs="", model_path=str(model_dir), model_id="random",
                 out_dir="", work_dir="", ref_cache="") for k in range(n)]


def alone(cell, exs, device):
    """A cell trained alone with peft's own (unrouted) adapter: the math of runner.train.loop, as
    tests/test_group.py's `_alone`. Returns (initial, final) adapter weights."""
    import torch

    from runner.train.adapters import adapter_state
    from runner.train.batches import pair_batch, response_logps
    from runner.train.doses import schedule
    from runner.train.loop import build_model
    from runner.train.losses import make_loss

    t = cell.train
    model = build_model(cell).to(device)
    first = adapter_state(model, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    loss_fn, grad_acc = make_loss(t), t.batch_size // t.micro_batch_size
    model.train()
    for step in schedule(len(exs), t.batch_size, t.epochs, cell.seed):
        for m in range(grad_acc):
            ex = [exs[i] for i in step[m * t.micro_batch_size:(m + 1) * t.micro_batch_size]]
            b = {k: v.to(device) for k, v in pair_batch(ex, PAD).items()}
            lp = response_logps(model, b)
            n_tok = b["response_mask"][:, 1:].sum(-1).float()
            k = len(ex)
            losses, _, _ = loss_fn(lp[:k], lp[k:], b["ref_chosen"], b["ref_rejected"], n_tok[:k], n_tok[k:])
            (losses.mean() / grad_acc).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = adapter_state(model, "default")
    del model, opt
    return first, out


def compare(together: dict, alone_: dict, first: dict, tol: float, rel_tol: float) -> dict:
    """One adapter trained in the group against the same cell alone (`first`: its initial weights)."""
    import torch

    if together.keys() != alone_.keys() or not together:
        return {"ok": False, "error": f"adapter weights differ in names: {sorted(set(together) ^ set(alone_))[:3]}"}
    worst = max((together[k].float() - alone_[k].float()).abs().max().item() for k in alone_)
    diff = math.sqrt(sum(((together[k].float() - alone_[k].float()) ** 2).sum().item() for k in alone_))
    moved = math.sqrt(sum(((alone_[k].float() - first[k].float()) ** 2).sum().item() for k in alone_))
    rel = diff / moved if moved else math.inf
    return {"ok": bool(worst < tol and rel < rel_tol), "max_abs_diff": worst, "rel_diff": rel,
            "moved_norm": moved, "tol": tol, "rel_tol": rel_tol}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, cfg: dict) -> None:
    """One process of the group (of `world`); rank 0 also trains each cell alone and writes the result."""
    import torch
    import torch.distributed as dist

    from runner.train.adapters import adapter_state
    from runner.train.group import build_group, run_steps

    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(cfg["threads"])
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}",
                                rank=rank, world_size=world)
    try:
        group = cells(Path(cfg["model"]), cfg["train"], len(cfg["subsets"]))
        t0 = time.perf_counter()
        model, router, slots = build_group(group, cfg["subsets"], device)
        stepped = [len(s) for s in run_steps(model, router, slots, PAD, device, rank, world, cfg["per_forward"])]
        group_s = time.perf_counter() - t0
        together = [adapter_state(model, s.name) for s in slots]
        first_loss = [s.history[0]["loss"] for s in slots]
        backend = dist.get_backend() if world > 1 else None
        del model, router, slots
        if rank != 0:
            return
        if cuda:
            torch.cuda.empty_cache()
        tol, rel_tol = cfg["tolerances"]
        res = {}
        t1 = time.perf_counter()
        for k, (cell, exs) in enumerate(zip(group, cfg["subsets"])):
            first, out = alone(cell, exs, device)
            res[cell.cell_id] = {**compare(together[k], out, first, tol, rel_tol), "first_loss": first_loss[k]}
        if cfg.get("swap"):  # the check's own check: adapter 0 of the group against cell 1 alone
            first, out = alone(group[1], cfg["subsets"][1], device)
            res["swapped"] = compare(together[0], out, first, tol, rel_tol)
        Path(cfg["out"]).write_text(json.dumps({"adapters": res, "group_steps": stepped, "backend": backend,
                                                "group_s": group_s, "alone_s": time.perf_counter() - t1}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def check_group(device: str = "cuda", world: int | None = None, shape: str | None = None, max_length: int | None = None,
                micro: int = 2, per_forward: int | None = None, threads: int = 2, work: Path | None = None,
                swap: bool = False, precision: str | None = None) -> dict:
    """The grouped-LoRA check (see the module docstring); the result's `ok` says whether it passed."""
    import torch

    from runner.spec import LoraSpec, TrainSpec
    from runner.train.reference import subsets_logps

    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU here (use --device cpu)")
    world = world or (torch.cuda.device_count() if cuda else 1)
    shape = shape or ("135m" if cuda else "tiny")
    max_length = max_length or (512 if cuda else 64)
    precision = precision or ("bf16" if cuda else "fp32")
    lr, tol, rel_tol = SETTINGS[precision]
    # jobs/paper.yaml's LoRA and DPO settings but the learning rate; two micro-batches per worker and step
    train = TrainSpec(method="dpo", finetune="lora", lora=LoraSpec(r=16, alpha=32, dropout=0.0), beta=0.1, lr=lr,
                      epochs=1, batch_size=2 * micro * world, micro_batch_size=micro, max_length=max_length,
                      workers=world, gpus_per_worker=1 if cuda else 0, bf16=precision == "bf16")
    with tempfile.TemporaryDirectory(prefix="valind-group-check-", dir=work) as tmp:
        model_dir = Path(tmp) / "model"
        write_model(SHAPES[shape], model_dir)
        pool = examples(max(k * micro + n * train.batch_size for k, n in enumerate(STEPS)), max_length,
                        SHAPES[shape]["vocab_size"])
        refs = subsets_logps(str(model_dir), [pool], micro, threads, False, train.bf16)[0]  # the policy's precision
        for e, (c, r) in zip(pool, refs):
            e.ref_chosen, e.ref_rejected = c, r
        # overlapping subsets of unequal size, as conditions sharing pairs
        subsets = [pool[k * micro:k * micro + n * train.batch_size] for k, n in enumerate(STEPS)]
        cfg = {"device": device, "model": str(model_dir), "train": train, "subsets": subsets,
               "per_forward": per_forward, "threads": threads, "port": _free_port(), "tolerances": (tol, rel_tol),
               "swap": swap,
               "out": str(Path(tmp) / "result.json")}
        if world > 1:
            import torch.multiprocessing as mp
            mp.spawn(_rank, args=(world, cfg), nprocs=world, join=True)
        else:
            _rank(0, 1, cfg)
        result = json.loads(Path(cfg["out"]).read_text())
    adapters = {k: v for k, v in result["adapters"].items() if k != "swapped"}
    ln2 = all(abs(a["first_loss"] - math.log(2)) < 1e-2 for a in adapters.values())
    ok = all(a["ok"] for a in adapters.values()) and ln2
    return {"ok": ok, "device": device, "world": world, "backend": result["backend"], "shape": shape,
            "precision": precision, "lr": lr, "tol": tol, "rel_tol": rel_tol, "max_length": max_length,
            "micro_batch_size": micro,
            "adapters_per_forward": per_forward or len(STEPS), "group_steps": result["group_steps"],
            "loss_first_is_ln2": ln2, "adapters": adapters, "swapped": result["adapters"].get("swapped"),
            "group_s": round(result["group_s"], 1), "alone_s": round(result["alone_s"], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--world", type=int, help="processes (default: every GPU; on CPUs 1; >1 on CPUs uses gloo)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: 135m on CUDA, tiny on CPUs")
    ap.add_argument("--max-length", type=int, help="tokens per pair's longest sequence (default 512 CUDA, 64 CPU)")
    ap.add_argument("--precision", choices=sorted(SETTINGS), help="default: bf16 on CUDA, fp32 on CPUs")
    ap.add_argument("--per-forward", type=int, help="adapters' micro-batches per forward (default: all)")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    res = check_group(args.device, args.world, args.shape, args.max_length, per_forward=args.per_forward,
                      precision=args.precision)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"{'PASS' if res['ok'] else 'FAIL'}  group_lora: {res['world']} process(es), {res['precision']}, "
          f"worst |together - alone| {max(a['max_abs_diff'] for a in res['adapters'].values()):.2e}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
